"""Triton Python-backend entry point of the minisgl LLM engine (decoupled, streaming).

Thin on purpose: request parsing, responses, cancellation and metrics live in
`minisgl_backend.triton` (testable without a server); the engine in `minisgl_backend.frontend`.
"""

import os
import sys

import triton_python_backend_utils as pb_utils


def _import_adapter():
    """Import the adapter; from a source checkout, also find the checkout and its packages.

    The stub embeds its own libpython, whose sys.path holds neither the checkout nor a venv's
    site-packages; scripts/tritonserver exports both in PYTHONPATH and again in
    MINISGL_PYTHONPATH, because Triton starts the stub through `bash -c`, and a shell set-up
    (BASH_ENV, a container's profile) can replace PYTHONPATH on the way.
    """
    try:
        from minisgl_backend.triton.adapter import TritonAdapter
        return TritonAdapter
    except ImportError:
        here = os.path.dirname(os.path.realpath(__file__))
        extra = [os.path.abspath(os.path.join(here, "..", "..", ".."))]
        extra += [p for p in os.environ.get("MINISGL_PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [p for p in extra if p not in sys.path]
        for name in [m for m in sys.modules if m == "minisgl_backend" or m.startswith("minisgl_backend.")]:
            del sys.modules[name]  # a half-imported package from the first try
    try:
        from minisgl_backend.triton.adapter import TritonAdapter
        return TritonAdapter
    except ImportError as e:
        raise ImportError(
            f"{e}: the Python-backend stub (Python {sys.version.split()[0]}) cannot import the "
            f"engine. Start tritonserver with scripts/tritonserver (it sets PYTHONPATH and "
            f"MINISGL_PYTHONPATH to the checkout and its venv). PYTHONPATH={os.environ.get('PYTHONPATH')!r} "
            f"MINISGL_PYTHONPATH={os.environ.get('MINISGL_PYTHONPATH')!r} sys.path={sys.path}") from e


TritonAdapter = _import_adapter()


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        return TritonAdapter.auto_complete_config(auto_complete_model_config, pb_utils)

    def initialize(self, args):
        self.adapter = TritonAdapter(pb_utils, model_file=__file__)
        try:
            self.adapter.initialize(args)
        except Exception:
            self.adapter.finalize()  # no scheduler process may outlive a failed load
            raise

    def execute(self, requests):
        return self.adapter.execute(requests)

    def finalize(self):
        self.adapter.finalize()
