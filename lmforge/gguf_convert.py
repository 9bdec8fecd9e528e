"""Run llama.cpp's own ``convert_hf_to_gguf.py`` with the two things lmforge's models need from it.

Run as a script, in its own process, never imported by lmforge: the converter puts its own copy of
the ``gguf`` package (``gguf-py``, the one it was released with) first on ``sys.path``, and that copy
must not meet the ``gguf`` lmforge has installed (a process forked by ``models.forking`` may have imported
that one: it is forgotten first).

    python -m lmforge.gguf_convert CONVERTER_DIR MODEL_DIR OUTFILE TYPE

``TYPE`` is what the converter writes itself (``f32``, ``f16``, ``bf16``, ``q8_0``) or a 4-bit or
5-bit legacy type (``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``).  The converter stops at 8 bits (smaller
types are ``llama-quantize``'s job, a compiled tool), but the ``gguf`` package it ships quantizes the
legacy types in numpy; so for those the linear weights are quantized to ``TYPE`` while the converter
writes the file, the token embedding (the tied output layer of small models: the layer llama.cpp's
own 4-bit files keep at 6 bits) stays at Q8_0, and the file says ``TYPE`` in ``general.file_type``.

Two additions, both only where the converter would otherwise stop:
- a tokenizer llama.cpp does not recognise (its list holds published models; lmforge trains its own)
  but that is a byte-level BPE with GPT-2's split pattern is written with llama.cpp's ``gpt-2``
  pre-tokenizer, which is exactly that;
- a model without a SentencePiece file is not asked for one when ``sentencepiece`` is missing.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

LEGACY_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")
NATIVE_TYPES = ("f32", "f16", "bf16", "q8_0")


def _is_gpt2_byte_level(model_dir: Path) -> bool:
    """Whether the tokenizer splits text like GPT-2: a ByteLevel pre-tokenizer using its regex."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def main(converter: Path, model_dir: Path, outfile: Path, kind: str) -> None:
    sys.path[:0] = [str(converter), str(converter / "gguf-py")]
    for name in [name for name in sys.modules if name == "gguf" or name.startswith("gguf.")]:
        del sys.modules[name]  # the installed one, which the process this one was forked from had imported
    import gguf
    from conversion import base

    known_pre = base.TextModel.get_vocab_base_pre

    def vocab_pre(self, tokenizer) -> str:
        try:
            return known_pre(self, tokenizer)
        except NotImplementedError:
            if _is_gpt2_byte_level(model_dir):
                base.logger.info("tokenizer not in llama.cpp's list; a byte-level BPE with GPT-2's pattern: pre-tokenizer 'gpt-2'")
                return "gpt-2"
            raise NotImplementedError(f"llama.cpp does not know the pre-tokenizer of {model_dir / 'tokenizer.json'} "
                                      "and it is not GPT-2's byte-level split: the model cannot be exported to GGUF") from None

    base.TextModel.get_vocab_base_pre = vocab_pre

    sentencepiece_vocab = base.TextModel._create_vocab_sentencepiece

    def create_vocab_sentencepiece(self):
        if not (self.dir_model / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")  # what the converter expects
        return sentencepiece_vocab(self)

    base.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece

    if kind in LEGACY_TYPES:
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        forced = base.ModelBase.tensor_force_quant

        def force_quant(self, name, new_name, bid, n_dims):
            chosen = forced(self, name, new_name, bid, n_dims)
            if chosen is not False or n_dims < 2 or not new_name.endswith(".weight"):
                return chosen
            if self.match_model_tensor_name(new_name, gguf.MODEL_TENSOR.TOKEN_EMBD, bid) or \
                    self.match_model_tensor_name(new_name, gguf.MODEL_TENSOR.OUTPUT, bid):
                return gguf.GGMLQuantizationType.Q8_0
            return qtype

        base.ModelBase.tensor_force_quant = force_quant
        add_file_type = gguf.GGUFWriter.add_file_type
        gguf.GGUFWriter.add_file_type = lambda self, _ftype: add_file_type(self, gguf.LlamaFileType[f"MOSTLY_{kind.upper()}"])
        outtype = "q8_0"
    elif kind in NATIVE_TYPES:
        outtype = kind
    else:
        raise SystemExit(f"unknown GGUF type {kind!r}: one of {', '.join(NATIVE_TYPES + LEGACY_TYPES)}")

    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    runpy.run_path(str(converter / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
