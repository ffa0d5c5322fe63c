"""Triton Python-backend entry point of the minisgl LLM engine (decoupled, streaming).

Thin on purpose: request parsing, responses, cancellation and metrics live in
`minisgl_backend.triton` (testable without a server); the engine in `minisgl_backend.frontend`.
"""

import os
import sys

import triton_python_backend_utils as pb_utils

try:
    from minisgl_backend.triton.adapter import TritonAdapter
except ImportError:  # running from a source checkout without the package installed
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path.insert(0, os.path.abspath(os.path.join(_here, "..", "..", "..")))
    from minisgl_backend.triton.adapter import TritonAdapter


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
