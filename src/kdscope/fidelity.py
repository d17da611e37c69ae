"""Teacher-student fidelity from per-item generation records on the same prompts (study.md section 4).

Inputs are the JSONL files `kdscope.evaluation.evaluate_generate` writes (one per task, ``<task>.jsonl`` in a run folder).
Measures, per task:
- agreement: share of items whose parsed answers are equal (math: within the study's 0.001 tolerance); an item where
  either model gave no parsable answer does not agree;
- BLEU of the student's rationale against the teacher's (sacrebleu; mean sentence BLEU and corpus BLEU) and chrF;
- embedding cosine of the two rationales with a sentence-transformers model (optional extra ``embeddings``);
- the 2x2 joint-correctness table: both right, only the teacher, only the student, neither.
Token-level fidelity (`token_fidelity`) needs both models: the student's mean KL(teacher || student) and top-1
agreement per token, teacher-forced on the teacher's own generated rationale. A pair whose tokenizers differ (a
cross-family pair) is compared on aligned spans (`aligned_token_fidelity`, kdscope.xtok); agreement and the other
record-based measures compare texts and answers, so they need nothing of the tokenizers.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .errors import InputError
from .evaluation import read_done
from .padding import pad_rows
from .tasks import MATH_TOLERANCE, get_task
from .teacher import logit_width
from .xtok import align_text, aligned_batch, shared_vocabulary, token_spelling, xtok_loss_parts

Records = dict[int, dict[str, Any]]


# --------------------------------------------------------------------------------------------------------------------
# Loading and pairing
# --------------------------------------------------------------------------------------------------------------------
def load_run(folder: Path | str) -> dict[str, Records]:
    """Per-task records of a run folder (``<task>.jsonl`` files written by `kdscope eval`), by item index."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder; give the --out folder of a `kdscope eval --mode generate` run")
    runs: dict[str, Records] = {}
    for path in sorted(root.glob("*.jsonl")):
        try:
            name = get_task(path.stem).name
        except KeyError:
            continue  # other JSONL files (not a task's records) are not part of the comparison
        runs[name] = read_done(path)
    if not runs:
        raise InputError(f"{root}: no <task>.jsonl records; run `kdscope eval --mode generate --out {root}` first")
    return runs


def paired(teacher: Records, student: Records, task: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(teacher, student) records of the items both runs have, checking that they saw the same prompt."""
    pairs = []
    for i in sorted(set(teacher) & set(student)):
        t, s = teacher[i], student[i]
        if t.get("prompt") != s.get("prompt"):
            raise InputError(f"{task} item {i}: teacher and student records have different prompts; compare runs on the same data")
        pairs.append((t, s))
    if not pairs:
        raise InputError(f"{task}: the teacher and student records share no item indices")
    return pairs


# --------------------------------------------------------------------------------------------------------------------
# Answer-level measures
# --------------------------------------------------------------------------------------------------------------------
def same_answer(task_name: str, a: Any, b: Any) -> bool:
    """Whether two parsed answers agree; a missing answer (null) agrees with nothing."""
    if a is None or b is None:
        return False
    if get_task(task_name).answer_type == "number":
        return abs(float(a) - float(b)) <= MATH_TOLERANCE
    return a == b


def answer_agreement(task_name: str, pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> float:
    """Share of items where the student's parsed answer equals the teacher's."""
    return sum(same_answer(task_name, t["pred"], s["pred"]) for t, s in pairs) / len(pairs)


@dataclass(frozen=True)
class JointTable:
    """2x2 joint correctness counts."""

    both: int
    teacher_only: int
    student_only: int
    neither: int


def joint_correctness(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> JointTable:
    counts = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    for t, s in pairs:
        counts[(bool(t["correct"]), bool(s["correct"]))] += 1
    return JointTable(counts[(True, True)], counts[(True, False)], counts[(False, True)], counts[(False, False)])


# --------------------------------------------------------------------------------------------------------------------
# Rationale similarity
# --------------------------------------------------------------------------------------------------------------------
def rationale_overlap(teacher_texts: Sequence[str], student_texts: Sequence[str]) -> dict[str, float]:
    """BLEU (mean sentence-level and corpus-level) and chrF of student texts against teacher texts, 0-100."""
    import sacrebleu

    sentence = [sacrebleu.sentence_bleu(s, [t]).score for t, s in zip(teacher_texts, student_texts)]
    return {
        "bleu_sentence": sum(sentence) / len(sentence),
        "bleu_corpus": sacrebleu.corpus_bleu(list(student_texts), [list(teacher_texts)]).score,
        "chrf": sacrebleu.corpus_chrf(list(student_texts), [list(teacher_texts)]).score,
    }


def embedding_cosine(
    teacher_texts: Sequence[str], student_texts: Sequence[str], model_path: str | Path, batch_size: int = 32
) -> float:
    """Mean cosine similarity of the two rationales' sentence embeddings (sentence-transformers, optional extra)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise InputError("embedding cosine needs sentence-transformers: pip install 'kdscope[embeddings]'") from None
    encoder = SentenceTransformer(str(model_path), device="cpu" if not torch.cuda.is_available() else None)
    a = encoder.encode(list(teacher_texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    b = encoder.encode(list(student_texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)
    return float((a * b).sum(-1).mean())


# --------------------------------------------------------------------------------------------------------------------
# Token-level fidelity
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def token_fidelity(
    teacher: Any,
    student: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    teacher_outputs: Sequence[str],
    batch_size: int = 8,
    student_tokenizer: Any = None,
) -> dict[str, float]:
    """Teacher-forced on prompt + the teacher's own output: mean KL(teacher || student) and top-1 agreement over the
    output tokens (token-weighted). Logits are cut to the common vocabulary width (Qwen2.5 sizes differ in padding).
    ``student_tokenizer``: the student's; when its vocabulary is not the teacher's (``tokenizer``), the positions
    are compared on aligned spans (`aligned_token_fidelity`)."""
    if student_tokenizer is not None and student_tokenizer is not tokenizer and \
            student_tokenizer.get_vocab() != tokenizer.get_vocab():
        return aligned_token_fidelity(teacher, student, tokenizer, student_tokenizer, prompts, teacher_outputs,
                                      batch_size)
    sequences = []
    for prompt, output in zip(prompts, teacher_outputs):
        prompt_ids = tokenizer(prompt)["input_ids"]
        full = tokenizer(prompt + output)["input_ids"]
        if len(full) > len(prompt_ids):
            sequences.append((full, len(prompt_ids)))
    if not sequences:
        raise InputError("token fidelity: no teacher output has any tokens")
    device = next(student.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kl_sum, agree, count = 0.0, 0, 0
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        ids, mask = pad_rows([seq for seq, _ in batch], pad)  # right padding: causal models need no position shift
        scored = torch.zeros((len(batch), ids.shape[1] - 1), dtype=torch.bool)  # position p predicts token p+1
        for r, (seq, prompt_len) in enumerate(batch):
            scored[r, prompt_len - 1 : len(seq) - 1] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
        s_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
        vocab = min(t_logits.shape[-1], s_logits.shape[-1])
        t_logp = torch.log_softmax(t_logits[..., :vocab][scored].float(), dim=-1)
        s_logp = torch.log_softmax(s_logits[..., :vocab][scored].float(), dim=-1)
        kl_sum += float((t_logp.exp() * (t_logp - s_logp)).sum())
        agree += int((t_logp.argmax(-1) == s_logp.argmax(-1)).sum())
        count += int(scored.sum())
    return {"kl_teacher_student": kl_sum / count, "top1_agreement": agree / count, "tokens": float(count)}


@torch.no_grad()
def aligned_token_fidelity(
    teacher: Any,
    student: Any,
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    prompts: Sequence[str],
    teacher_outputs: Sequence[str],
    batch_size: int = 8,
) -> dict[str, float]:
    """`token_fidelity` for two tokenizers: each model reads prompt + output in its own tokens, and the two
    tokenisations are aligned by byte offsets (kdscope.xtok). The scored spans are those whose teacher tokens all
    follow the teacher's prompt tokens. ``kl_teacher_student``: the mean over those spans of xtok_kl at T=1 (a 1:1
    span: exact KL on the token strings both vocabularies write, the rest one tail bucket per side; a merged span: KL
    of [P(span), 1 - P(span)]). ``top1_agreement``: over the 1:1 spans, whether both models' most likely next token
    writes the same string (a string only one side can write never agrees). With one tokenizer every span is a
    token and both equal `token_fidelity`'s. ``tokens``: scored spans; ``one_to_one_spans``: those top-1 counts."""
    spellings = (token_spelling(student_tokenizer), token_spelling(teacher_tokenizer))
    vocab = shared_vocabulary(*spellings, logit_width(student), logit_width(teacher))
    rows = []
    for prompt, output in zip(prompts, teacher_outputs):
        s_ids, t_ids, alignment = align_text(prompt + output, student_tokenizer, teacher_tokenizer,
                                             spellings=spellings)
        t_prompt = len(teacher_tokenizer(prompt)["input_ids"])
        first = next((span.student[0] for span in alignment.spans if span.teacher[0] >= t_prompt), None)
        if first is not None and first >= 1:
            rows.append((s_ids, t_ids, alignment, first))
    if not rows:
        raise InputError("token fidelity: no teacher output has any tokens")
    s_device, t_device = next(student.parameters()).device, next(teacher.parameters()).device
    kl_sum, agree, spans, one_to_one = 0.0, 0, 0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        s_ids, s_mask = pad_rows([r[0] for r in batch], student_tokenizer.pad_token_id or 0)
        t_ids, t_mask = pad_rows([r[1] for r in batch], teacher_tokenizer.pad_token_id or 0)
        scored = torch.zeros(s_ids.shape, dtype=torch.bool)  # student positions predicting the scored spans' tokens
        for r, (ids, _, _, first) in enumerate(batch):
            scored[r, first - 1 : len(ids) - 1] = True
        aligned = aligned_batch([r[2] for r in batch], s_ids, t_ids, scored)
        if not aligned.spans:
            continue
        s_logits = student(input_ids=s_ids.to(s_device), attention_mask=s_mask.to(s_device)).logits.float()
        t_logits = teacher(input_ids=t_ids.to(t_device), attention_mask=t_mask.to(t_device)).logits.float()
        parts = xtok_loss_parts(s_logits, t_logits.to(s_logits.device), aligned, vocab, "xtok_kl", 1.0, False)
        kl_sum += float(parts.total)
        spans += parts.count
        one = aligned.one_to_one
        first_s = aligned.student.span_start[:-1][one]
        first_t = aligned.teacher.span_start[:-1][one]
        s_top = s_logits[aligned.student.batch[first_s], aligned.student.position[first_s]].argmax(-1).cpu()
        t_top = t_logits[aligned.teacher.batch[first_t], aligned.teacher.position[first_t]].argmax(-1).cpu()
        s_bucket, t_bucket = vocab.student_bucket[s_top], vocab.teacher_bucket[t_top]
        agree += int(((s_bucket == t_bucket) & (s_bucket < vocab.shared)).sum())
        one_to_one += int(one.sum())
    if not spans:
        raise InputError("token fidelity: no aligned span of the teacher outputs follows its prompt")
    return {"kl_teacher_student": kl_sum / spans, "top1_agreement": agree / one_to_one if one_to_one else float("nan"),
            "tokens": float(spans), "one_to_one_spans": float(one_to_one)}


# --------------------------------------------------------------------------------------------------------------------
# Whole-run comparison and tables
# --------------------------------------------------------------------------------------------------------------------
def compare_task(task_name: str, teacher: Records, student: Records, embed_model: str | Path | None = None) -> dict[str, Any]:
    """All record-based fidelity measures of one task."""
    pairs = paired(teacher, student, task_name)
    result: dict[str, Any] = {"task": task_name, "n": len(pairs), "agreement": answer_agreement(task_name, pairs)}
    result.update(rationale_overlap([t["output"] for t, _ in pairs], [s["output"] for _, s in pairs]))
    if embed_model is not None:
        result["embedding_cosine"] = embedding_cosine([t["output"] for t, _ in pairs], [s["output"] for _, s in pairs], embed_model)
    result["joint"] = asdict(joint_correctness(pairs))
    return result


def compare_runs(teacher_dir: Path | str, student_dir: Path | str, embed_model: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Fidelity per task for every task present in both run folders."""
    teacher, student = load_run(teacher_dir), load_run(student_dir)
    common = [t for t in teacher if t in student]
    if not common:
        raise InputError(f"{teacher_dir} and {student_dir} have no task in common")
    return {task: compare_task(task, teacher[task], student[task], embed_model) for task in common}


# Table name -> (measure, scale): EM1-style agreement in percent, BLEU/chrF already 0-100, cosine x100 like BLEU.csv.
TABLES: dict[str, tuple[str, float]] = {
    "agreement": ("agreement", 100.0),
    "bleu_sentence": ("bleu_sentence", 1.0),
    "bleu_corpus": ("bleu_corpus", 1.0),
    "chrf": ("chrf", 1.0),
    "embedding_cosine": ("embedding_cosine", 100.0),
}


def table_row(results: dict[str, dict[str, Any]], measure: str, scale: float, teacher: str, student: str, method: str) -> dict[str, Any]:
    """A row in the layout of the study's EM1*/BLEU* CSVs: Teacher, Student, Pair, Method, one column per task."""
    row: dict[str, Any] = {"Teacher": teacher, "Student": student, "Pair": f"{teacher} -> {student}", "Method": method}
    for task, res in results.items():
        row[get_task(task).study_folder] = scale * res[measure]
    return row


def write_tables(results: dict[str, dict[str, Any]], out_dir: Path | str, teacher: str, student: str, method: str) -> list[Path]:
    """``<measure>.csv`` per measure (one row) and ``fidelity.json`` with everything, including the joint tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    first = next(iter(results.values()))
    for name, (measure, scale) in TABLES.items():
        if measure not in first:
            continue
        row = table_row(results, measure, scale, teacher, student, method)
        path = out / f"{name}.csv"
        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
        written.append(path)
    path = out / "fidelity.json"
    payload = {"teacher": teacher, "student": student, "method": method, "tasks": results}
    path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    written.append(path)
    return written
