"""The async engine: the engine core in its own process, driven over ZeroMQ by :class:`AsyncLLM`.

Import from the submodules (``client``, ``core_proc``, ``protocol``, ``stats``); this package
file stays empty so that importing one of them does not pull in the others.

May import: ``pdserve.engine.*`` (the core process builds an ``EngineCore``), pyzmq and msgspec.
"""
