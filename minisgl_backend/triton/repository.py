"""Write a copy of model_repository/ with some config.pbtxt parameters overridden.

Used by `make serve MODEL=... TP=...`, `make bench-triton` and the test fixtures, so that the
checked-in config.pbtxt is never edited:

    python -m minisgl_backend.triton.repository build/serve_repo --set model_path=/m --set tp_size=2

The version folder (1/, holding model.py) is linked, not copied, so edits to model.py apply.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

from minisgl_backend.checkout import ROOT
from minisgl_backend.lora import MULTI_LORA_FILE

SOURCE = ROOT / "model_repository"
MODEL_NAME = "minisgl"

_PARAM_RE = re.compile(
    r'parameters\s*:?\s*\{\s*key\s*:\s*"(?P<key>[^"]+)"\s*value\s*:?\s*\{\s*string_value\s*:\s*"(?P<value>(?:[^"\\]|\\.)*)"\s*\}\s*\}')


def _quote(value: object) -> str:
    text = value if isinstance(value, str) else (str(value).lower() if isinstance(value, bool) else str(value))
    return json.dumps(text)  # a pbtxt string literal accepts JSON escapes


def read_parameters(pbtxt: str) -> dict[str, str]:
    return {m.group("key"): json.loads(f'"{m.group("value")}"') for m in _PARAM_RE.finditer(pbtxt)}


def set_parameters(pbtxt: str, overrides: dict[str, object]) -> str:
    """Return `pbtxt` with each override's string_value replaced (or a parameters entry added)."""
    remaining = dict(overrides)

    def replace(match: re.Match) -> str:
        key = match.group("key")
        if key not in remaining:
            return match.group(0)
        return f'parameters: {{ key: "{key}" value: {{ string_value: {_quote(remaining.pop(key))} }} }}'

    out = _PARAM_RE.sub(replace, pbtxt)
    extra = "".join(f'parameters: {{ key: "{k}" value: {{ string_value: {_quote(v)} }} }}\n'
                    for k, v in remaining.items())
    if extra and not out.endswith("\n"):
        out += "\n"
    return out + extra


def make_model_repository(dest: str | os.PathLike, overrides: dict[str, object] | None = None,
                          source: str | os.PathLike = SOURCE, model_name: str = MODEL_NAME,
                          extra_config: str = "", lora_modules: dict[str, str] | None = None) -> Path:
    """Create `dest/<model_name>/{config.pbtxt, 1 -> source/<model>/1}` (and a multi_lora.json of
    `lora_modules`, which turns LoRA on); return `dest`."""
    dest, source = Path(dest), Path(source)
    model_src = source / MODEL_NAME
    model_dst = dest / model_name
    if model_dst.exists() or model_dst.is_symlink():
        shutil.rmtree(model_dst)
    model_dst.mkdir(parents=True)
    pbtxt = (model_src / "config.pbtxt").read_text()
    overrides = dict(overrides or {})
    if lora_modules:
        (model_dst / MULTI_LORA_FILE).write_text(json.dumps({n: os.path.abspath(p) for n, p in lora_modules.items()}))
        overrides.setdefault("enable_lora", "true")
    pbtxt = set_parameters(pbtxt, overrides)
    if model_name != MODEL_NAME:
        pbtxt = f'name: "{model_name}"\n' + pbtxt
    (model_dst / "config.pbtxt").write_text(pbtxt + extra_config)
    for version in sorted(p for p in model_src.iterdir() if p.is_dir() and p.name.isdigit()):
        (model_dst / version.name).symlink_to(version.resolve(), target_is_directory=True)
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config.pbtxt parameter (repeatable); empty values are skipped")
    parser.add_argument("--lora", action="append", default=[], metavar="NAME=FOLDER",
                        help="a LoRA adapter for multi_lora.json (repeatable); turns enable_lora on")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        if value != "":
            overrides[key.strip()] = value
    loras = dict(item.partition("=")[::2] for item in args.lora)
    if any(not name or not folder for name, folder in loras.items()):
        parser.error("--lora expects NAME=FOLDER")
    path = make_model_repository(args.dest, overrides, lora_modules=loras)
    print(path)


if __name__ == "__main__":
    main()
