"""pdserve.kernels: Triton kernels (paged attention, KV cache writes, RMSNorm, rotary, SiLU, skinny matmul), each
beside a pure-torch reference in ``reference`` that its tests compare against; ``ops`` lists the public ones.

May import: torch and triton only; nothing else of pdserve. (The folder sits at the repository root, so the root
must never be on sys.path before site-packages: it would shadow the PyPI package ``kernels``; pyproject.toml.)
"""
