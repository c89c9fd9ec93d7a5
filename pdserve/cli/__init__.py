"""pdserve.cli: the ``pdserve`` command (``main`` dispatches to one module per subcommand), the engine flags every
engine command shares (``engine_args``), ``generate``, ``up`` (the whole stack on one machine), ``bench`` (the
benchmark kinds) and ``local_servers`` (free ports, a throwaway redis-server).

May import: every pdserve package, each only inside the subcommand that needs it (the operator must not load torch).
"""
