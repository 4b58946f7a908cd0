"""
How far a stage's training prompts are from the evaluation set it is judged on, printed before RL
trains (scripts/chat_rl.py, scripts/chat_rsft.py): the difficulty-bucket and prompt-length
histograms side by side, the total variation distance (TVD) of each, and a warning past a threshold.

Why: RL and RSFT improve the model on the prompts they sample. A prompt set drawn from another mix
than the evaluation set (only easy MultiHop questions, a prompts file from another source) can raise
the training reward while the evaluation barely moves, or move where the evaluation weighs little;
the report makes that visible before any compute is spent.

TVD(p, q) = 1/2 sum_i |p_i - q_i| over the bins' shares: the share of prompts that would have to
change bin to turn one histogram into the other; 0 for the same mix, 1 for disjoint ones. The
thresholds (WARN_BUCKET_TVD, WARN_LENGTH_TVD) and the reasons for them are in distribution_report().
Conversations are the tasks/ dicts (tasks/common.py) with an optional "bucket"; this module never
imports tasks/.
"""

import math

import numpy as np

# A warning when the bucket mix differs by more than this: a fifth of the training prompts in other
# buckets than the evaluation would put them in. Reasons in distribution_report().
WARN_BUCKET_TVD = 0.2
# A warning when the prompt-length mix differs by more than this (more bins, more noise: looser).
WARN_LENGTH_TVD = 0.3
# Prompt-length bins in tokens: half-octave edges round(2^(k/2)), 16 to 4096, plus [0, 16) and
# [4096, inf). Fixed, so that two runs' reports compare; half-octaves keep a bin's width
# proportional to the lengths in it, from short chat turns to long few-shot prompts.
LENGTH_EDGES = [0] + [round(2 ** (k / 2)) for k in range(8, 25)]
MAX_PROMPTS = 2000  # prompts measured per side at most (a seeded subset): rendering 20,000 prompts takes seconds
NO_BUCKET = "(none)"


def tvd(p, q):
    """Total variation distance of two share vectors (the same bins, each summing to 1): 1/2 sum |p - q|, in [0, 1]."""
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def tvd_noise(p, q, n_p, n_q):
    """
    The TVD expected between two independent samples of n_p and n_q items drawn from one mix (the
    pooled shares of p and q): 1/2 sum_i E|N(0, s_i)| = 1/2 sum_i sqrt(2 / pi) s_i with
    s_i^2 = m_i (1 - m_i) (1 / n_p + 1 / n_q), the normal approximation of each bin's difference.
    A measured TVD near this is sampling noise, not a different mix.
    """
    pooled = [(a * n_p + b * n_q) / (n_p + n_q) for a, b in zip(p, q)]
    return 0.5 * sum(math.sqrt(2 / math.pi * m * (1 - m) * (1 / n_p + 1 / n_q)) for m in pooled)


def _subset(conversations, limit, seed):
    """At most `limit` conversations of a sequence (len and [i]): all of them, or a seeded subset in order."""
    n = len(conversations)
    picks = range(n) if n <= limit else sorted(np.random.default_rng(seed).choice(n, limit, replace=False).tolist())
    return [conversations[i] for i in picks]


def _shares(labels, bins):
    counts = [0] * len(bins)
    index = {b: i for i, b in enumerate(bins)}
    for label in labels:
        counts[index[label]] += 1
    return [c / len(labels) for c in counts]


def length_bin(n):
    """The label of the LENGTH_EDGES bin holding a length of n tokens: "64-90", or "4096+"."""
    i = int(np.searchsorted(LENGTH_EDGES, n, side="right")) - 1
    return f"{LENGTH_EDGES[i]}+" if i == len(LENGTH_EDGES) - 1 else f"{LENGTH_EDGES[i]}-{LENGTH_EDGES[i + 1] - 1}"


def distribution_report(train, evaluation, tokenizer, bucket_order=(), names=("train", "eval"), max_prompts=MAX_PROMPTS, seed=0):
    """
    Compare the training prompts with the evaluation problems.

    train, evaluation: sequences of conversations (len() and [i]: a Task, a list); each side is
    measured on all of them, or on a seeded subset of max_prompts. tokenizer: renders a prompt as
    the model sees it (Tokenizer.render_for_completion: the conversation without its last
    assistant reply, then <|assistant_start|>); its length in tokens is binned by LENGTH_EDGES.
    bucket_order: the declared buckets (a task's `buckets`), listed first, in that order; others
    follow sorted, and conversations without one count as "(none)". names: the two columns.

    Returns a dict: "n" (the two sizes measured), "buckets" and "lengths" ({bin: (train share,
    eval share)}, only bins either side uses), "bucket_tvd" (None when neither side has a bucket),
    "length_tvd", "bucket_noise" / "length_noise" (tvd_noise: what two samples of one mix of these
    sizes would show), "warnings" (lines starting "WARNING: ") and "text" (the tables and lines to print).

    Thresholds: a warning when the bucket TVD is above WARN_BUCKET_TVD = 0.2 or the length TVD
    above WARN_LENGTH_TVD = 0.3. Why these: the TVD is the share of prompts that would have to move
    bin. 0.2 in buckets means a fifth of the training signal lands on difficulties the evaluation
    does not hold in that proportion: easy-only MultiHop prompts against its test mix (about 40%
    easy, 20% medium, 40% hard) measure 0.58, easy and medium 0.38, and both warn; a mild tilt such
    as 50/20/30 is 0.1 and passes. At the default sizes (2,000 prompts measured, 400 evaluation
    problems, 3 buckets) two samples of one mix differ by about 0.03 (measured: MultiHop train vs
    test 0.05, GSM8K 0.02), so 0.2 is not noise. Lengths fall in more bins (5 to 8 occupied for
    MultiHop and GSM8K), and harmless template changes (a system message, more distractor facts)
    shift them too, so the bar is looser: 0.3 still catches prompts that buckets miss, a file of
    much longer or shorter questions, since a task's splits share the same few bins (MultiHop
    train vs test 0.02, GSM8K 0.04, noise about 0.04; easy-only MultiHop 0.44). With a few dozen
    prompts on a side the noise approaches the thresholds: compare the TVD with the printed noise.
    """
    sides = [_subset(train, max_prompts, seed), _subset(evaluation, max_prompts, seed)]
    if not sides[0] or not sides[1]:
        raise ValueError(f"distribution_report needs conversations on both sides, got {len(sides[0])} and {len(sides[1])}")
    n = [len(s) for s in sides]
    buckets = [[c.get("bucket") or NO_BUCKET for c in s] for s in sides]
    seen = set(buckets[0]) | set(buckets[1])
    bucket_bins = [b for b in bucket_order if b in seen] + sorted(seen - set(bucket_order))
    lengths = [[length_bin(len(tokenizer.render_for_completion(c))) for c in s] for s in sides]
    length_bins = sorted(set(lengths[0]) | set(lengths[1]), key=lambda label: int(label.split("-")[0].rstrip("+")))
    out = {"n": n, "warnings": []}
    lines = [f"prompt distribution: {n[0]:,} {names[0]} prompts vs {n[1]:,} {names[1]} problems"]
    for what, labels, bins, limit in (("bucket", buckets, bucket_bins, WARN_BUCKET_TVD), ("length", lengths, length_bins, WARN_LENGTH_TVD)):
        p, q = _shares(labels[0], bins), _shares(labels[1], bins)
        out[what + "s"] = {b: (a, c) for b, a, c in zip(bins, p, q)}
        if what == "bucket" and bins == [NO_BUCKET]:
            out["bucket_tvd"] = out["bucket_noise"] = None
            lines.append("buckets: none on either side")
            continue
        distance, noise = tvd(p, q), tvd_noise(p, q, n[0], n[1])
        out[what + "_tvd"], out[what + "_noise"] = distance, noise
        header = "bucket" if what == "bucket" else "prompt tokens"
        lines += ["", f"| {header} | {names[0]} | {names[1]} |", "|---|---|---|"]
        lines += [f"| {b} | {100 * a:.1f}% | {100 * c:.1f}% |" for b, a, c in zip(bins, p, q)]
        lines.append(f"{what} TVD {distance:.3f} (two samples of one mix: ~{noise:.3f}; warning above {limit})")
        if distance > limit:
            noisy = f"; but two samples of one mix this small differ by ~{noise:.2f}: measure on more" if distance < 2 * noise else ""
            out["warnings"].append(f"WARNING: the {names[0]} prompts' {what} mix is far from the {names[1]} set's "
                                   f"(TVD {distance:.2f} > {limit}): gains in training may not show in the evaluation{noisy}")
    out["text"] = "\n".join(lines + out["warnings"])
    return out
