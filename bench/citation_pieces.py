"""The citation constraint's candidate texts: a 16-token window in one `batch_decode` against the whole answer per
candidate (`CitationConstraint.pieces`, legal/constrain.py).

    .venv/bin/python bench/citation_pieces.py --run runs/civil_law [--answers data/civil_law_dev.jsonl] [--n 40]

For each of the first --n reference answers of the dev set, tokenised by the run's tokenizer, every third prefix is
taken as an answer so far and 30 random tokens plus the answer's real next token as candidates: the windowed pieces
must equal the whole-answer ones (prints how many differ). Then the time of one widened step (1 024 candidates)
after the longest answer, both ways.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True)
    ap.add_argument("--answers", default="data/civil_law_dev.jsonl")
    ap.add_argument("--n", type=int, default=40)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from kotune.legal.constrain import CitationConstraint

    tok = AutoTokenizer.from_pretrained(args.run)
    proc = CitationConstraint(tok, [[]], prompt_len=0)
    with open(args.answers, encoding="utf-8") as f:
        answers = [json.loads(line)["reference"] for line in f if line.strip()][: args.n]
    rng = random.Random(0)
    checked = different = 0
    for answer in answers:
        gen = tok(answer, add_special_tokens=False)["input_ids"]
        for end in range(1, len(gen) + 1, 3):
            so_far = gen[:end]
            text = tok.decode(so_far, skip_special_tokens=True)
            candidates = rng.sample(range(tok.vocab_size), 30) + gen[end : end + 1]
            whole = [tok.decode(so_far + [t], skip_special_tokens=True)[len(text) :] for t in candidates]
            different += sum(a != b for a, b in zip(proc.pieces(so_far, text, candidates), whole))
            checked += len(candidates)
    print(f"{len(answers)} answers, {checked} candidates: {different} windowed pieces differ from the whole answer's")

    gen = max((tok(a, add_special_tokens=False)["input_ids"] for a in answers), key=len)
    text = tok.decode(gen, skip_special_tokens=True)
    candidates = list(range(1000, 2024))
    t = time.perf_counter()
    for c in candidates:
        tok.decode(gen + [c], skip_special_tokens=True)
    whole_s = time.perf_counter() - t
    t = time.perf_counter()
    proc.pieces(gen, text, candidates)
    window_s = time.perf_counter() - t
    print(
        f"1024 candidates after a {len(gen)}-token answer: whole answer per candidate {whole_s * 1000:.1f} ms, "
        f"window in one batch_decode {window_s * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
