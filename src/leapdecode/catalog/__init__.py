"""Method families beyond the core ones: each module here calls `leapdecode.methods.register(...)`
for its methods when imported, and `leapdecode.methods` imports every module here."""
