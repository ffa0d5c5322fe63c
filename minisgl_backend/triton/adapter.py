"""The Triton Python-backend adapter behind `model_repository/minisgl/1/model.py`.

`TritonAdapter` loads and unloads the model and runs `execute`: it parses each request, rejects
what cannot be served, submits the rest to the `Frontend` and returns at once (decoupled). Three
other threads answer the requests: the frontend's receiver and the sender thread stream their
responses back (sender.py), and the watcher thread handles cancellation, engine death and
metrics (watcher.py). Their threading rules are written down there; the one here: `execute`
holds the IPC lock as a whole (`StubLock.for_execute`), so no stub call from another thread
happens while it runs.

`pb_utils` (the `triton_python_backend_utils` module) is passed in, so the adapter can be
driven by a fake in unit tests.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from functools import partial
from typing import Any

from minisgl_backend.checkout import resolve_model_path
from minisgl_backend.config import AdapterConfig, EngineConfig, adapter_setting_names
from minisgl_backend.processes import freeze_startup_objects
from minisgl_backend.triton.contract import INPUTS, OUTPUTS
from minisgl_backend.triton.lora_control import answer_lora_command, lora_command, lora_modules_of
from minisgl_backend.triton.metrics import EngineMetrics
from minisgl_backend.triton.parsing import ParsedRequest, RequestError, parse_request
from minisgl_backend.triton.responses import ResponseAssembler, error_reply
from minisgl_backend.triton.sender import LiveRequest, ResponseSender, StubLock
from minisgl_backend.triton.stub_check import stub_numpy_problem
from minisgl_backend.triton.watcher import Watcher

logger = logging.getLogger("minisgl.triton")


def split_parameters(model_config: dict) -> tuple[dict[str, str], AdapterConfig]:
    """config.pbtxt parameters -> (engine settings, adapter settings). An empty value means the
    default; a key that is neither (unknown, or removed) stays with the engine settings, so that
    `EngineConfig.from_flat` fails the load naming it."""
    engine_keys = set(EngineConfig().to_flat())
    adapter_keys = adapter_setting_names()
    engine, adapter = {}, {}
    for key, value in (model_config.get("parameters") or {}).items():
        text = value.get("string_value", "") if isinstance(value, dict) else str(value)
        if key.isupper():  # Python-backend settings such as EXECUTION_ENV_PATH
            continue
        if key in adapter_keys:
            if text != "":
                adapter[key] = text
        elif text != "" or key == "model_path" or key not in engine_keys:
            engine[key] = text
    return engine, AdapterConfig.from_flat(adapter)


def serving_cpu_threads(local_ranks: int) -> int:
    """Torch threads per scheduler rank of this node on the CPU under Triton: one core stays with
    tritonserver and this stub (with every core computing, each step waits for the thread the
    serving layer preempted)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - 1) // local_ranks)


class TritonAdapter:
    def __init__(self, pb_utils: Any, model_file: str | None = None) -> None:
        self.pb = pb_utils
        self.model_file = model_file
        self.fe: Any = None
        self.metrics: EngineMetrics | None = None
        self.vocab_size: int | None = None
        self.settings = AdapterConfig()
        self.model_name = "minisgl"
        self.stub_lock = StubLock()
        self.replies = ResponseSender(pb_utils, self.stub_lock)
        self.watcher: Watcher | None = None
        self._finalized = False

    # ------------------------------------------------------------ model config

    @staticmethod
    def auto_complete_config(cfg: Any, pb_utils: Any) -> Any:
        """Fill in the tensor contract and the decoupled policy where config.pbtxt lacks them."""
        current = cfg.as_dict()
        have_inputs = {i["name"] for i in current.get("input", [])}
        have_outputs = {o["name"] for o in current.get("output", [])}
        for spec in INPUTS:
            if spec.name not in have_inputs:
                cfg.add_input(spec.as_config())
        for spec in OUTPUTS:
            if spec.name not in have_outputs:
                cfg.add_output({k: v for k, v in spec.as_config().items() if k != "optional"})
        cfg.set_max_batch_size(0)
        cfg.set_model_transaction_policy({"decoupled": True})
        return cfg

    # ------------------------------------------------------------ life cycle

    def initialize(self, args: dict) -> None:
        from minisgl_backend.frontend import Frontend

        logging.basicConfig(level=os.environ.get("MINISGL_LOG_LEVEL", "INFO"),
                            format="[minisgl] %(levelname)s %(name)s: %(message)s")
        problem = stub_numpy_problem(self.pb)
        if problem:
            raise RuntimeError(problem)
        model_config = json.loads(args["model_config"])
        if not self.pb.using_decoupled_model_transaction_policy(model_config):
            raise ValueError("the minisgl model streams: set model_transaction_policy { decoupled: true }")
        engine, self.settings = split_parameters(model_config)
        engine["model_path"] = resolve_model_path(engine.get("model_path", ""), self.model_file)
        config = EngineConfig.from_flat(engine)
        if config.parallel.cpu_threads == 0:
            config.parallel.cpu_threads = serving_cpu_threads(config.parallel.ranks_per_node)
        logger.info("starting engine: %s", config.to_flat())
        self.fe = Frontend(config, deliver=self.replies.on_news, lora_modules=lora_modules_of(args))
        self.vocab_size = self.fe.info.vocab_size
        self.model_name = args.get("model_name", self.model_name)
        self.metrics = EngineMetrics(self.pb, self.model_name, args.get("model_version", "1"), self._adapter_names)
        freeze_startup_objects()
        self.start_threads()
        logger.info("engine ready (context %d tokens)", self.fe.context_len)

    def _adapter_names(self) -> dict[str, str]:
        """{folder: name} of the LoRA adapters served (the label of their metrics)."""
        return {path: name for name, path in self.fe.lora.listing().items()} if self.fe.lora is not None else {}

    def start_threads(self) -> None:
        """The sender and watcher threads, once `fe`, `metrics` and `settings` are set."""
        self.replies.fe, self.replies.metrics = self.fe, self.metrics
        self.watcher = Watcher(self.pb, self.stub_lock, self.replies, self.fe, self.settings, self.model_name)
        self.watcher.start()
        self.replies.start()

    def finalize(self) -> None:
        if self._finalized:
            return
        self._finalized = True
        if self.watcher is not None:
            self.watcher.stop()
        if self.fe is not None:
            try:
                self.fe.shutdown()  # fails what is still in flight through the sender
            except Exception:
                logger.exception("frontend shutdown failed")
        self.replies.stop()
        for live in self.replies.drain():
            self.replies.send(live, error_reply("UNAVAILABLE", "the model is being unloaded"))
        if self.metrics is not None and self.stub_lock.lock.acquire(timeout=5):
            try:
                self.metrics.close()
            finally:
                self.stub_lock.lock.release()
        self.metrics = self.replies.metrics = None

    # ------------------------------------------------------------ requests

    def execute(self, requests: list) -> None:
        with self.stub_lock.for_execute():  # no send / poll / metric update from another thread meanwhile
            self._execute(requests)
        if self.watcher is not None:
            self.watcher.serving.set()
        return None

    def _execute(self, requests: list) -> None:
        for request in requests:
            try:
                self._start(request)
            except Exception as exc:  # nothing a client sends may take the model down
                logger.error("request failed before submission: %s", traceback.format_exc())
                try:
                    sender = request.get_response_sender()
                    self.replies.send_raw(sender, error_reply("INTERNAL", f"{type(exc).__name__}: {exc}"))
                except Exception:
                    logger.exception("could not answer a failed request")

    def _start(self, request: Any) -> None:
        sender = request.get_response_sender()
        arrival = time.monotonic()
        try:
            command = lora_command(self._input(request, "lora_request"))
            if command is not None:
                self.replies.send_raw(sender, answer_lora_command(self.fe, command))
                return
            parsed = parse_request(partial(self._input, request), _parameters_of(request), self.vocab_size)
        except RequestError as exc:
            self._reject(sender, "INVALID_ARG", str(exc))
            return
        if not self.fe.is_healthy():
            self._reject(sender, "UNAVAILABLE", "the engine is not running (a scheduler process died); "
                                                "reload the model or restart the server", invalid=False)
            return
        assembler = ResponseAssembler(parsed, self._prompt_echo(parsed), self._decode_token)
        live = LiveRequest(sender, parsed, assembler, arrival)
        self.replies.track(live)
        try:
            live.rid = self.fe.submit(parsed.prompt, parsed.params, partial(self.replies.on_output, live),
                                      stream=parsed.stream)
        except ValueError as exc:  # InvalidRequest among them
            self.replies.forget(live)
            self._reject(sender, "INVALID_ARG", str(exc))
        except RuntimeError as exc:
            self.replies.forget(live)
            self._reject(sender, "UNAVAILABLE", str(exc), invalid=False)
        except Exception:
            self.replies.forget(live)  # never left behind to get a second FINAL at unload
            raise

    def _input(self, request: Any, name: str) -> Any:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None
        try:
            return tensor.as_numpy()
        except Exception as exc:
            raise RequestError(f"input {name!r} could not be decoded ({type(exc).__name__}: {exc}); a STRING "
                               "tensor must hold elements each prefixed by its 4-byte little-endian length")

    def _prompt_echo(self, parsed: ParsedRequest) -> str:
        if parsed.stream or parsed.exclude_input_in_output:
            return ""
        if isinstance(parsed.prompt, str):
            return parsed.prompt
        if parsed.prompt_text is not None:
            return parsed.prompt_text
        try:
            return self.fe.tokenizer.decode(parsed.prompt, skip_special_tokens=True)
        except Exception:
            return ""

    def _decode_token(self, token: int) -> str:
        return self.fe.tokenizer.decode([token])

    def _reject(self, sender: Any, code: str, message: str, invalid: bool = True) -> None:
        if invalid and self.metrics is not None:
            with self.stub_lock.lock:  # execute()'s thread (it holds the lock already)
                self.metrics.on_invalid()
        self.replies.send_raw(sender, error_reply(code, message))


def _parameters_of(request: Any) -> str | None:
    getter = getattr(request, "parameters", None)
    if getter is None:
        return None
    try:
        return getter()
    except Exception:
        return None
