"""Method families. Each module declares its methods as `METHODS`, a tuple of `MethodSpec` (`spec.py`);
importing a module registers nothing: `leapdecode.methods` lists the families and builds the registry."""
