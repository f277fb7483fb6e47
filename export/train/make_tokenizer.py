"""Builds the shapes-tiny tokenizer: a Llama-style SentencePiece BPE model trained on the instruction corpus.

The model has the official layout (`<unk>`, `<s>`, `</s>` at 0-2, byte fallback, SentencePiece's own
normaliser settings as the Llama tokenizer has them) so the official-format loader and our converter read
it unchanged; VisionLLM v2's added tokens follow the base vocabulary in the official order.

    python -m visionllm_edge.export.train.make_tokenizer OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from visionllm_edge import contract
from visionllm_edge.export.config import data_path
from visionllm_edge.shapes.instructions import TASKS, make_sample

BASE_VOCAB = 768
CORPUS_SEED = 7919  # disjoint from the training and evaluation seeds


def corpus_lines(n_per_task: int = 300) -> list[str]:
    lines = [contract.SYSTEM_PROMPT, "USER: ASSISTANT:"]
    for task in TASKS:
        for i in range(n_per_task):
            s = make_sample(task, CORPUS_SEED, i)
            for q, a in [*s.history, (s.question, s.answer)]:
                lines.append(q)
                lines.append(a)
    # Digits, punctuation and every keypoint/colour word on their own so nothing is left to bytes.
    lines.append("0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" ( ) -")
    return lines


def build(out_dir: Path) -> None:
    import sentencepiece as spm

    template = data_path("tiny_tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(corpus_lines()) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), model_type="bpe", vocab_size=BASE_VOCAB,
            character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
            normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
            hard_vocab_limit=True, minloglevel=2,
        )  # fmt: skip
        tmp_out = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        shutil.copy(Path(tmp) / "sp.model", tmp_out / "tokenizer.model")
    # The added tokens keep the template's order, renumbered after the new base vocabulary.
    added = json.loads((template / "added_tokens.json").read_text())
    old_base = min(i for i in added.values() if i > 2)  # after <unk>, <s>, </s>
    renumber = {tok: i if i < old_base else i - old_base + BASE_VOCAB for tok, i in added.items()}
    (tmp_out / "added_tokens.json").write_text(json.dumps(renumber, indent=2, sort_keys=True) + "\n")
    config = json.loads((template / "tokenizer_config.json").read_text())
    decoder = {}
    for key, entry in config["added_tokens_decoder"].items():
        i = int(key)
        decoder[str(i if i < old_base else i - old_base + BASE_VOCAB)] = entry
    config["added_tokens_decoder"] = decoder
    (tmp_out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(template / "special_tokens_map.json", tmp_out / "special_tokens_map.json")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp_out.rename(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    build(parser.parse_args().out)


if __name__ == "__main__":
    main()
