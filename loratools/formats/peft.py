"""The PEFT format itself (`adapter_config.json` + `adapter_model.safetensors`): the hub every conversion
goes through. Reading validates the adapter as every other command does (loratools.adapter.load_adapter) and
keeps the saved tensors as they are, key for key and dtype for dtype."""
from __future__ import annotations

import json
from pathlib import Path

from ..adapter import CONFIG_NAME, WEIGHTS_NAME, is_adapter_dir, load_adapter
from ..io.durability import DURABLE
from ..io.output import write_adapter_files
from ..io.safetensors_format import read_header, read_tensor
from . import PeftFiles, register


class PeftFormat:
    name = "peft"

    def detect(self, path: Path) -> bool:
        # MLX-LM's adapters also have an adapter_config.json: PEFT's weights file (or peft_type) decides
        path = Path(path)
        if not is_adapter_dir(path):
            return False
        if any((path / n).is_file() for n in (WEIGHTS_NAME, "adapter_model.bin")):
            return True
        try:
            return "peft_type" in json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return False

    def read(self, path: Path, base: Path | None = None) -> PeftFiles:
        ad = load_adapter(path)  # every check the other commands make (config, shapes, NaN/Inf)
        wpath = Path(path) / WEIGHTS_NAME
        infos, _ = read_header(str(wpath))
        with open(wpath, "rb", buffering=0) as fh:
            tensors = {key: read_tensor(info, fh) for key, info in infos.items()}
        return PeftFiles(config=dict(ad.config), tensors=tensors, source=self.name, path=Path(path))

    def check(self, files: PeftFiles, base: Path | None = None) -> None:
        """PEFT holds every adapter loratools reads."""

    def write(self, files: PeftFiles, out_dir: Path, base: Path | None = None, *, provenance=None,
              durability=None) -> list[str]:
        return write_adapter_files(out_dir, files.config, files.tensors, provenance=provenance,
                                   durability=durability or DURABLE)


FORMAT = register(PeftFormat())
__all__ = ["FORMAT", "PeftFormat", "CONFIG_NAME", "WEIGHTS_NAME"]
