"""pdserve.operator: the kopf operator for ``InferenceService``: the CRD (``crd``), spec parsing (``spec``), pure
rendering of the child objects (``render``, ``pods``, ``dashboards``), handlers, status and the CLI.

May import: kopf, kubernetes, yaml and itself; nothing else of pdserve (it must not pull in torch). The folder name
shadows the standard library's ``operator`` if the repository root is first on sys.path: pyproject.toml says why
it never is.
"""
