"""Lossy layer-skipping methods (quality measured by `leapdecode bench`'s quality columns):
`ffn_skip` (FFN-SkipLLM), `skipdecode` (SkipDecode), `first` (FiRST), `early_exit` (confidence early exit).
`skipping` holds the wrappers and context managers they (and the lossless `self-spec` drafter) share."""
