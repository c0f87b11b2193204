"""Retrieval benchmark: quality on the labelled set, ingest throughput, query latency at 10k/100k chunks.

    .venv/bin/python -m bench.retrieval quality            # recall@k / MRR: hybrid vs dense vs lexical
    .venv/bin/python -m bench.retrieval quality --korean   # the same on the Korean questions only
    .venv/bin/python -m bench.retrieval scale [--sizes 10000 100000] [--real 5000] [--queries 200]
    .venv/bin/python -m bench.retrieval router [--margin 0 0.03] [--verbose]   # tune the agent's relevance filter

`quality` ingests tests/data/retrieval/docs into a fresh knowledge base through the real path and
asks every question of tests/data/retrieval/queries.jsonl; a question counts as found at k when one
of the top-k chunks comes from the labelled document and contains the labelled evidence text.

`router` asks the same questions as the agent does (top `retrieval_k` hits) and notes the answer passage's
dense score and lexical coverage when it ranks there, then asks every question of tests/data/retrieval/off_topic.txt
(none about the documents) and notes every hit's scores (even for a question the router would not search, such
as "who are you": stricter than the agent). It prints how many answers the agent's relevance filter
(`assistant.agent.relevant`) keeps, by kind, and how many off-topic questions keep a passage; then a grid search
over rules of the same shape, and of a shape with a sum clause, for the rule that keeps the most answers while no
off-topic question keeps a passage and every off-topic hit stays at least `--margin` (in score units, on both
scores at once) from being kept; of those, it chooses the one with the fewest clauses, then agent.py's shape.

`scale` measures, on this CPU with the embedded embedder (fp32, `--threads` torch threads):
1. ingest throughput of the real path (`KnowledgeBase.ingest`: extract, chunk, embed, store, index)
   on real English text (docstrings of the Python standard library and installed packages);
2. query latency (query embedding + chromadb + BM25 + fusion + fetching texts) at each size.
Embedding 100k chunks here would take hours, so each index holds `--real` really embedded real chunks,
and the rest are controlled variants of them: the same text plus a unique reference line (so BM25 posting
lists grow as with real data), and the same vector plus Gaussian noise, renormalised, at cosine ~0.93 to
the original (so the HNSW graph does not hold exact duplicates). Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "retrieval"
HANGUL = re.compile(r"[\uac00-\ud7a3]")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU ({cpu}), load average {load:.1f} at start, Python {platform.python_version()}"


def make_settings(home: Path, **overrides):
    from assistant.config import Settings

    s = Settings.load(env={}, home=home, **overrides)
    s.ensure_dirs()
    return s


def bench_user(uid: int = 1, role: str = "user"):
    from memory.types import User

    return User(id=uid, username=f"bench{uid}", role=role, created_at=datetime.now(UTC))


# ---------------------------------------------------------------------------------------- quality
def load_labelled() -> list[dict]:
    return [json.loads(line) for line in (DATA / "queries.jsonl").read_text(encoding="utf-8").splitlines() if line]


def ingest_labelled(kb, user) -> dict[str, str]:
    """Ingest the labelled documents as shared documents; returns filename -> doc id."""
    ids = {}
    for path in sorted((DATA / "docs").iterdir()):
        ids[path.name] = kb.ingest_path(user, path, scope="shared").doc_id
    return ids


def found_rank(hits, doc_id: str, evidence: str) -> int | None:
    want = " ".join(evidence.split())
    for rank, h in enumerate(hits, 1):
        if h.doc_id == doc_id and want in " ".join(h.text.split()):
            return rank
    return None


def evaluate(kb, user, queries: list[dict], ids: dict[str, str], mode: str, k: int = 10) -> list[int | None]:
    return [found_rank(kb.search(user, q["q"], k=k, mode=mode), ids[q["doc"]], q["evidence"]) for q in queries]


def recall_at(ranks: list[int | None], k: int) -> float:
    return sum(1 for r in ranks if r is not None and r <= k) / len(ranks)


def mrr(ranks: list[int | None]) -> float:
    return sum(1.0 / r for r in ranks if r is not None) / len(ranks)


def quality(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from memory.knowledge import KnowledgeBase

    queries = load_labelled()
    if args.korean:  # Korean questions only (every document stays in the index, as distractors)
        queries = [q for q in queries if HANGUL.search(q["q"])]
    with tempfile.TemporaryDirectory() as tmp:
        kb = KnowledgeBase(make_settings(Path(tmp), embedder=args.embedder))
        user = bench_user()
        ids = ingest_labelled(kb, user)
        print(f"{len(ids)} documents, {kb.count_chunks()} chunks, {len(queries)} questions; "
              f"{kb.settings.embedder} on {kb.embedder.backend}; {machine()}\n")
        kinds = sorted({q["kind"] for q in queries})
        print("| mode | recall@1 | recall@3 | recall@5 | MRR | " + " | ".join(f"R@5 {k}" for k in kinds) + " |")
        print("|---" * (5 + len(kinds)) + "|")
        for mode in ("hybrid", "dense", "lexical"):
            ranks = evaluate(kb, user, queries, ids, mode)
            by_kind = [recall_at([r for r, q in zip(ranks, queries, strict=True) if q["kind"] == k], 5) for k in kinds]
            print(f"| {mode} | {recall_at(ranks, 1):.2f} | {recall_at(ranks, 3):.2f} | {recall_at(ranks, 5):.2f} | "
                  f"{mrr(ranks):.2f} | " + " | ".join(f"{x:.2f}" for x in by_kind) + " |")
            if args.verbose:
                for r, q in zip(ranks, queries, strict=True):
                    if r is None or r > 5:
                        print(f"    miss ({mode}): {q['q']!r} -> rank {r}")
        kb.close()


# ---------------------------------------------------------------------------------------- router
OFF = 9.0  # a threshold that switches its clause off


def load_off_topic() -> list[str]:
    return [x.strip() for x in (DATA / "off_topic.txt").read_text(encoding="utf-8").splitlines() if x.strip()]


@dataclass(frozen=True)
class Rule:
    """Keep a passage when dense >= dense_min, or cover >= cover_min, or both scores reach `both`, or
    dense >= sum_floor and dense + cover >= sum_min. The shape of `assistant.agent.relevant`, plus a sum clause."""

    dense_min: float = OFF
    cover_min: float = OFF
    both: tuple[float, float] = (OFF, OFF)
    sum_floor: float = OFF
    sum_min: float = OFF

    def distance(self, d, c):
        """How far (d, c) is from being kept, moving both scores by at most that much; <= 0 when kept."""
        import numpy as np

        return np.minimum.reduce([self.dense_min - d, self.cover_min - c,
                                  np.maximum(self.both[0] - d, self.both[1] - c),
                                  np.maximum(self.sum_floor - d, (self.sum_min - d - c) / 2)])

    @property
    def clauses(self) -> int:
        return (self.dense_min < OFF) + (self.cover_min < OFF) + (self.both[0] < OFF) + (self.sum_min < OFF)

    @property
    def shape(self) -> str:
        return "sum clause" if self.sum_min < OFF else "current shape" if self.both[0] < OFF else "dense or cover"

    def __str__(self) -> str:
        parts = [f"dense >= {self.dense_min:.2f}" if self.dense_min < OFF else "",
                 f"cover >= {self.cover_min:.2f}" if self.cover_min < OFF else "",
                 f"(dense >= {self.both[0]:.2f} and cover >= {self.both[1]:.2f})" if self.both[0] < OFF else "",
                 f"(dense >= {self.sum_floor:.2f} and dense + cover >= {self.sum_min:.2f})"
                 if self.sum_min < OFF else ""]
        return " or ".join(p for p in parts if p)


def answer_hits(kb, user, queries: list[dict], ids: dict[str, str], k: int) -> list[tuple[dict, object]]:
    """Each labelled question with its answer passage among the top `k` hits (what the agent's search step
    gets), or None when the answer does not rank there."""
    found = []
    for q in queries:
        hits = kb.search(user, q["q"], k=k)
        rank = found_rank(hits, ids[q["doc"]], q["evidence"])
        found.append((q, hits[rank - 1] if rank else None))
    return found


def scores(hit) -> tuple[float, float]:
    return hit.dense_score or 0.0, hit.lexical_coverage or 0.0


def grid_search(shape: str, answers, off, margins: list[float]) -> dict[float, Rule]:
    """For each margin, the rule of `shape` ("dense or cover", "current shape" or "sum clause") that keeps the most
    answers while every off-topic hit stays at least `margin` (and above 0) from being kept; ties go to fewer clauses,
    then to the larger margin, then to the lower thresholds."""
    import numpy as np

    dense_grid, cover_grid = frange(0.20, 0.60, 0.01), [*frange(0.30, 1.0, 0.01), OFF]
    xs = np.array(frange(0.0, 0.40, 0.01) if shape != "dense or cover" else [OFF])  # pair clause: dense floor
    ys = np.array(frange(0.0, 0.60, 0.01) if shape == "current shape" else frange(0.30, 1.20, 0.01) if shape ==
                  "sum clause" else [OFF])  # and cover (current shape) or dense + cover (sum clause)

    def pair(d, c):  # distance to the pair clause, shape (len(xs), len(ys), points)
        x, y = xs[:, None, None], ys[None, :, None]
        second = (y - d - c) / 2 if shape == "sum clause" else y - c
        return np.maximum(x - d, second)

    pair_ans, pair_off = pair(*answers), pair(*off)
    useful = np.ones((len(xs), len(ys)), bool)
    best: dict[float, tuple[tuple, Rule]] = {}
    for dm in dense_grid:
        for cm in cover_grid:
            m = np.minimum(np.minimum(dm - off[0], cm - off[1]), pair_off).min(-1)
            kept = (np.minimum(np.minimum(dm - answers[0], cm - answers[1]), pair_ans) <= 0).sum(-1)
            if shape != "dense or cover":  # the pair clause must add something the other two do not
                useful = (xs[:, None] < dm) & ((ys[None, :] < cm) if shape == "current shape"
                                               else (ys[None, :] - xs[:, None] < cm))
            for margin in margins:
                ok = useful & (m > 0) & (m >= margin - 1e-9)
                if not ok.any():
                    continue
                score = np.where(ok, kept * 1000.0 + np.round(m, 3), -1.0)
                i, j = np.unravel_index(int(score.argmax()), score.shape)  # first best: lowest floor, then second
                both = (float(xs[i]), float(ys[j])) if shape == "current shape" else (OFF, OFF)
                floor, total = (float(xs[i]), float(ys[j])) if shape == "sum clause" else (OFF, OFF)
                rule = Rule(dm, cm, both, floor, total)
                key = (int(kept[i, j]), -rule.clauses, round(float(m[i, j]), 3))
                if margin not in best or key > best[margin][0]:
                    best[margin] = key, rule
    return {margin: rule for margin, (_, rule) in best.items()}


def frange(lo: float, hi: float, step: float) -> list[float]:
    return [round(lo + i * step, 2) for i in range(int(round((hi - lo) / step)) + 1)]


def router(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from assistant.agent import BOTH_MIN, COVERAGE_MIN, DENSE_MIN, relevant
    from memory.knowledge import KnowledgeBase

    queries, off_topic = load_labelled(), load_off_topic()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        kb = KnowledgeBase(make_settings(Path(tmp), embedder=args.embedder))
        user, k = bench_user(), kb.settings.retrieval_k
        ids = ingest_labelled(kb, user)
        found = answer_hits(kb, user, queries, ids, k)
        off_hits = [(q, kb.search(user, q, k=k)) for q in off_topic]
        print(f"{len(ids)} documents, {kb.count_chunks()} chunks; {len(queries)} labelled questions, "
              f"{len(off_topic)} off-topic; top {k} hits; {kb.settings.embedder} on {kb.embedder.backend}; "
              f"{machine()}\n")
        kb.close()

    kinds = sorted({q["kind"] for q in queries})
    top = [(q, h) for q, h in found if h is not None]
    answers = np.array([scores(h) for _, h in top]).T
    off = np.array([scores(h) for _, hits in off_hits for h in hits]).T
    kind_of = np.array([q["kind"] for q, _ in top])
    in_top = {kind: int((kind_of == kind).sum()) for kind in kinds}

    current = Rule(DENSE_MIN, COVERAGE_MIN, BOTH_MIN)
    # the vectorised rule must agree with the agent's own filter
    assert [relevant(h) for _, h in top] == list(current.distance(*answers) <= 0)
    if args.verbose:
        for q, h in found:
            d, c = scores(h) if h else (float("nan"), float("nan"))
            mark = "miss" if h is None else ("kept" if relevant(h) else "DROP")
            print(f"  {mark} {q['kind']:<11} dense {d:.2f} cover {c:.2f}  {q['q']}")
        for q, hits in off_hits:
            print(f"  off-topic max dense {max((scores(h)[0] for h in hits), default=0):.2f} "
                  f"cover {max((scores(h)[1] for h in hits), default=0):.2f} "
                  f"{'KEPT ' if any(relevant(h) for h in hits) else ''}{q}")
        print()

    d, c = off
    worst = {"dense": d.max(), "cover": c.max(), "dense + cover": (d + c).max(),
             "min(dense, cover)": np.minimum(d, c).max()}
    print("off-topic maxima over all hits: " + ", ".join(f"{name} {v:.2f}" for name, v in worst.items()))
    print(f"labelled answers in the top {k}: " + ", ".join(f"{kind} {in_top[kind]}" for kind in kinds)
          + f" (of {len(queries)}: " + ", ".join(f"{kind} {sum(q['kind'] == kind for q in queries)}" for kind in kinds)
          + ")\n")

    best_of = {shape: grid_search(shape, answers, off, args.margin)
               for shape in ("dense or cover", "current shape", "sum clause")}
    rows = [("current (agent.py)", current)]
    rows += [(f"{shape}, margin >= {margin:.2f}", best[margin]) for margin in args.margin
             for shape, best in best_of.items() if margin in best]
    # The choice, at the largest margin asked for: most answers kept, then fewest clauses, then the shape agent.py
    # already has, then the larger margin.
    margin = max(args.margin)
    chosen = max((best[margin] for best in best_of.values() if margin in best),
                 key=lambda r: (int((r.distance(*answers) <= 0).sum()), -r.clauses, r.shape == "current shape",
                                float(r.distance(*off).min())))

    off_question = [q for q, hits in off_hits for _ in hits]
    print("| rule | " + " | ".join(f"kept {kind}" for kind in kinds) + " | kept all | off-topic keeping a passage | "
          "off-topic margin (nearest) |")
    print("|---" * (len(kinds) + 4) + "|")
    for name, rule in rows:
        kept, near = rule.distance(*answers) <= 0, rule.distance(*off)
        by_kind = [f"{int(kept[kind_of == kind].sum())}/{in_top[kind]}" for kind in kinds]
        off_kept = len({q for q, x in zip(off_question, near, strict=True) if x <= 0})
        print(f"| {name}: `{rule}` | " + " | ".join(by_kind) + f" | {int(kept.sum())}/{len(top)} | "
              f"{off_kept}/{len(off_topic)} | {float(near.min()):.3f} ({off_question[int(near.argmin())]}) |")
    if args.verbose:
        was = current.distance(*answers) <= 0
        for name, rule in rows[1:]:
            now = rule.distance(*answers) <= 0
            print(f"\n{name}: " + "; ".join(f"{'+' if n else '-'} {q['q']} ({h.dense_score or 0:.2f}/"
                                            f"{h.lexical_coverage or 0:.2f})"
                                            for (q, h), w, n in zip(top, was, now, strict=True) if w != n))
    print(f"\nchosen (margin >= {margin:.2f}): `{chosen}`; {time.perf_counter() - started:.0f} s")


# ---------------------------------------------------------------------------------------- real text
def _docstring_texts(root: Path) -> Iterator[tuple[str, str]]:
    for f in sorted(root.rglob("*.py")):
        rel = str(f.relative_to(root))
        if "/test" in rel or rel.startswith("test") or "idlelib" in rel:
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # a few files in site-packages are templates or not UTF-8; they aren't needed
        docs = [ast.get_docstring(n) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        docs = [d for d in docs if d and len(d) >= 120]
        if docs:
            yield rel, "\n\n".join(docs)


def real_documents() -> Iterator[tuple[str, str]]:
    """(name, text) of real English technical prose: docstrings of the stdlib, then of installed packages."""
    yield from _docstring_texts(Path(os.__file__).parent)
    site = next((Path(p) for p in sys.path if p.endswith("site-packages")), None)
    for pkg in ("transformers", "torch", "sqlalchemy", "numpy", "pydantic", "datasets", "gradio", "peft", "trl"):
        if site and (site / pkg).is_dir():
            yield from ((f"{pkg}/{n}", t) for n, t in _docstring_texts(site / pkg))


def real_chunks(docs: Iterator[tuple[str, str]], n: int, embedder, chunk_tokens: int,
                overlap: int) -> tuple[list[str], list[tuple[str, str]]]:
    """`n` distinct real chunks (as ingest would cut them) and the documents they came from."""
    from memory.documents import chunk_spans

    seen, out, used = set(), [], []
    for name, text in docs:
        used.append((name, text))
        for c in chunk_spans(text, embedder.token_offsets(text), chunk_tokens, overlap):
            key = hashlib.sha256(c.text.encode()).digest()
            if key not in seen and len(c.text) > 200:
                seen.add(key)
                out.append(c.text)
        if len(out) >= n:
            break
    return out[:n], used


def embed_cached(embedder, texts: list[str], cache: Path | None):
    import numpy as np

    key = hashlib.sha256("\x00".join(texts).encode() + embedder.spec.encode()).hexdigest()[:16]
    if cache is not None:
        f = cache / f"emb-{key}.npy"
        if f.exists():
            return np.load(f), None
    started = time.perf_counter()
    vecs = embedder.encode(texts, batch_size=32)
    took = time.perf_counter() - started
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.save(cache / f"emb-{key}.npy", vecs)
    return vecs, took


# ---------------------------------------------------------------------------------------- scale
def measure_ingest(docs: Iterator[tuple[str, str]], target_chunks: int,
                   embedder: str | None = None) -> tuple[int, int, float, float]:
    """Real ingest path on whole documents until ~target_chunks chunks; returns (docs, chunks, wall s, CPU s)."""
    from memory.knowledge import KnowledgeBase

    # Read the documents before the clock starts: producing them (parsing source files) is not ingest.
    # A chunk holds ~650 new characters (170 tokens, 40 overlapping), so 1,500 per chunk is plenty.
    texts, budget = [], target_chunks * 1500
    for name, text in docs:
        texts.append((name, text))
        budget -= len(text)
        if budget <= 0:
            break
    with tempfile.TemporaryDirectory() as tmp:
        kb = KnowledgeBase(make_settings(Path(tmp), embedder=embedder))
        kb.warm()
        user = bench_user()
        n_docs = n_chunks = 0
        started, cpu = time.perf_counter(), time.process_time()
        for name, text in texts:
            if n_chunks >= target_chunks:
                break
            info = kb.ingest(user, f"doc{n_docs:04d}.txt", text.encode(), scope="shared",
                             title=name)
            n_docs += 1
            n_chunks += info.chunks
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
        kb.close()
    return n_docs, n_chunks, took, cpu


def fill(kb, pool: list[str], vecs, size: int, rng: random.Random, noise: float, users: int) -> float:
    """Write `size` chunks (real + variants) straight into the collections, as ingest would store them."""
    import numpy as np

    from memory.documents import Chunk
    from memory.knowledge import chunk_metadata, document_metadata

    nrng = np.random.default_rng(rng.randrange(1 << 30))
    per_doc = 20
    started = time.perf_counter()
    batch = 2000
    for b in range(0, size, batch):
        rows: dict[str, tuple[list, list, list, list]] = {}
        for i in range(b, min(size, b + batch)):
            base, variant = i % len(pool), i // len(pool)
            doc_no, idx = divmod(i, per_doc)
            text = pool[base]
            vec = vecs[base]
            if variant:
                text = f"{text}\n(revision {variant}, reference R{i:06d})"
                v = vec + nrng.normal(0.0, noise / np.sqrt(vec.shape[0]), vec.shape[0]).astype(np.float32)
                vec = v / np.linalg.norm(v)
            # 70 % shared, the rest private to one of `users` users: the querying user sees a share of it.
            owner = 1 + doc_no % users
            scope = "shared" if doc_no % 10 < 7 else "private"
            doc = document_metadata(f"b{doc_no:07d}", f"bench doc {doc_no}", f"doc{doc_no}.txt", "text", scope,
                                    owner, per_doc, 0, "0" * 64, 0.0)
            ids, texts, metas, embs = rows.setdefault(doc["visibility"], ([], [], [], []))
            ids.append(f"b{doc_no:07d}:{idx:05d}")
            texts.append(text)
            metas.append(chunk_metadata(doc, Chunk(idx, 0, len(text), text, 0)))
            embs.append(vec)
        for vis, (ids, texts, metas, embs) in rows.items():
            kb.collection_for(vis, create=True).add(ids=ids, documents=texts, metadatas=metas,
                                                    embeddings=np.stack(embs))
    return time.perf_counter() - started


def scale(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from memory.embedder import get_embedder
    from memory.knowledge import KnowledgeBase, embedder_cache, readable_by

    print(f"machine: {machine()}; torch threads {args.threads}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n")
    rng = random.Random(0)
    s0 = make_settings(Path(args.cache) if args.cache else Path(tempfile.mkdtemp()), embedder=args.embedder)
    emb = get_embedder(s0.embedder, embedder_cache(s0))
    print(f"embedder: {s0.embedder} on {emb.backend}")
    t = time.perf_counter()
    pool, docs = real_chunks(real_documents(), args.real, emb, s0.chunk_tokens, s0.chunk_overlap)
    print(f"real text: {len(pool)} chunks from {len(docs)} documents ({sum(len(x) for _, x in docs) / 1e6:.1f} MB) "
          f"in {time.perf_counter() - t:.1f} s")

    # 1. ingest throughput through the real path
    n_docs, n_chunks, took, cpu = measure_ingest(real_documents(), args.ingest_chunks, args.embedder)
    print(f"\ningest (real path): {n_docs} documents, {n_chunks} chunks in {took:.1f} s wall = "
          f"{n_chunks / took:.1f} chunks/s; {cpu:.1f} s CPU = {n_chunks / cpu:.1f} chunks per CPU-second")

    # 2. the real pool, embedded for real
    vecs, took = embed_cached(emb, pool, Path(args.cache) if args.cache else None)
    if took is not None:
        print(f"embedding the real pool: {len(pool)} chunks in {took:.1f} s = {len(pool) / took:.1f} chunks/s")
    mean_tokens = statistics.mean(emb.count_tokens(p) for p in pool[:500])
    print(f"real pool: {len(pool)} chunks, mean {mean_tokens:.0f} tokens")

    # queries: 6-12 consecutive words from random real chunks
    queries = []
    for _ in range(args.queries):
        words = rng.choice(pool).split()
        n = rng.randint(6, 12)
        start = rng.randrange(max(1, len(words) - n))
        queries.append(" ".join(words[start:start + n]))

    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            settings = make_settings(Path(tmp), embedder=args.embedder)
            kb = KnowledgeBase(settings)
            load_s = fill(kb, pool, vecs, size, rng, args.noise, args.users)
            kb.close()
            kb = KnowledgeBase(settings)
            t = time.perf_counter()
            kb.warm()
            build_s = time.perf_counter() - t
            user = bench_user(1)
            vis = readable_by(user)
            for q in queries[:10]:
                kb.search(user, q)  # warm-up: caches, HNSW pages
            total, cpu, t_emb, t_dense, t_lex = [], [], [], [], []
            for q in queries:
                t0, c0 = time.perf_counter(), time.process_time()
                kb.search(user, q)
                total.append((time.perf_counter() - t0) * 1000)
                cpu.append((time.process_time() - c0) * 1000)
                t0 = time.perf_counter()
                qv = emb.encode([q])
                t1 = time.perf_counter()
                for v in vis:
                    col = kb.collection_for(v)
                    if col is not None:
                        col.query(query_embeddings=qv, n_results=30, include=["distances"])
                t2 = time.perf_counter()
                kb.lexical.search(q, vis, 30)
                t3 = time.perf_counter()
                t_emb.append((t1 - t0) * 1000)
                t_dense.append((t2 - t1) * 1000)
                t_lex.append((t3 - t2) * 1000)
            visible = kb.lexical.count_visible(vis)
            rows.append((size, visible, load_s, build_s, total, cpu, t_emb, t_dense, t_lex))
            print(f"\n{size} chunks ({visible} visible to the querying user): bulk load {load_s:.0f} s, "
                  f"BM25 index build on open {build_s:.1f} s; query p50 {pct(total, .5):.1f} ms, "
                  f"p95 {pct(total, .95):.1f} ms wall; CPU p50 {pct(cpu, .5):.1f} ms, p95 {pct(cpu, .95):.1f} ms; "
                  f"load average now {os.getloadavg()[0]:.1f}")
            kb.close()

    print("\n| chunks in index | visible to user | query p50 wall (ms) | query p95 wall (ms) | query p50 CPU (ms) | "
          "query p95 CPU (ms) | embed p50 | chromadb p50 | BM25 p50 | BM25 p95 | BM25 build on open (s) |")
    print("|---" * 11 + "|")
    for size, visible, _load, build, total, cpu, te, td, tl in rows:
        print(f"| {size:,} | {visible:,} | {pct(total, .5):.1f} | {pct(total, .95):.1f} | {pct(cpu, .5):.1f} | "
              f"{pct(cpu, .95):.1f} | {pct(te, .5):.1f} | {pct(td, .5):.1f} | {pct(tl, .5):.1f} | {pct(tl, .95):.1f} | "
              f"{build:.1f} |")
    print(f"\nvector noise {args.noise} (cosine to the original ~{1 / np.sqrt(1 + args.noise ** 2):.2f}); "
          f"{args.queries} queries; {args.users} users")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--verbose", action="store_true")
    q.add_argument("--korean", action="store_true", help="only the questions written in Korean")
    q.add_argument("--embedder", default=None, help="settings.embedder (default: the embedded fp32 model)")
    r = sub.add_parser("router")
    r.add_argument("--margin", type=float, nargs="*", default=[0.0, 0.03],
                   help="least distance of every off-topic hit from being kept, in score units")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--verbose", action="store_true")
    r.add_argument("--embedder", default=None, help="settings.embedder (default: the embedded fp32 model)")
    sc = sub.add_parser("scale")
    sc.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    sc.add_argument("--real", type=int, default=5000, help="really embedded real chunks in each index")
    sc.add_argument("--ingest-chunks", type=int, default=500, help="chunks for the ingest throughput run")
    sc.add_argument("--queries", type=int, default=200)
    sc.add_argument("--noise", type=float, default=0.4)
    sc.add_argument("--users", type=int, default=20)
    sc.add_argument("--threads", type=int, default=1)
    sc.add_argument("--embedder", default=None, help="settings.embedder (default: the embedded fp32 model)")
    sc.add_argument("--cache", default=None, help="folder to cache real-pool embeddings between runs")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"quality": quality, "router": router, "scale": scale}[args.cmd](args)


if __name__ == "__main__":
    main()
