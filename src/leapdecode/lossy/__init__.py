"""Lossy layer-skipping methods (quality measured by `leapdecode bench`'s quality columns):
`ffn_skip` (FFN-SkipLLM), `skipdecode` (SkipDecode), `first` (FiRST), `early_exit` (confidence early exit).
They skip blocks through `leapdecode.layer_skip`, the mechanism the lossless `self-spec` drafter uses too."""
