"""The SAPT paper's qualitative claims, checked on one comparison table (compare_methods.py's summary).

The paper (Tables 1 and 2) claims that SAPT-LoRA forgets least and scores best among the continual
methods, comes close to the multi-task upper bound, transfers forward, collapses without ARM, and that
SAPT-Prompt beats the other prompt-based methods. Each claim is judged on the means over seeds (and
orders); the numbers it was judged on go with the verdict, so a reader sees how close a call was.
"""

from __future__ import annotations

SAPT_LORA, SAPT_PROMPT, NO_ARM = "sapt-lora", "sapt-prompt", "sapt-lora-no-arm"
# The paper's prompt-based rows other than SAPT-Prompt (Table 1's upper block).
OTHER_PROMPT_METHODS = ("l2p", "lfpt5", "prog-prompt", "epi")
WITHIN_UPPER_BOUND = 2.0  # AP points below the multi-task upper bound still counted as "close to it"
NO_ARM_FORGETTING_RATIO = 5.0  # F.Ra without ARM, as a multiple of SAPT-LoRA's


def _mean(summary: dict, row: str, column: str) -> float | None:
    return summary[row]["columns"][column]["mean"] if row in summary else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def check_claims(summary: dict, methods: set[str]) -> list[tuple[str, str, str]]:
    """(claim, verdict, evidence) per claim; verdict is "holds", "fails" or "not measured".

    ``summary`` maps a row to its ``reference`` kind and metric ``columns``; ``methods`` names the rows
    that are methods (not variants such as the ablations), of which the non-references are compared.
    """
    continual = [n for n, s in summary.items() if n in methods and not s["reference"]]
    joint = next((n for n, s in summary.items() if s["reference"] == "joint"), None)
    ap, fra = _mean(summary, SAPT_LORA, "AP"), _mean(summary, SAPT_LORA, "F.Ra")
    claims = []

    def judge(claim: str, ok: bool | None, evidence: str) -> None:
        claims.append((claim, "not measured" if ok is None else "holds" if ok else "fails", evidence))

    others = {n: (_mean(summary, n, "AP"), _mean(summary, n, "F.Ra")) for n in continual if n != SAPT_LORA}
    best_ap = max(((v[0], n) for n, v in others.items() if v[0] is not None), default=None)
    judge("SAPT-LoRA has the highest AP of the continual methods",
          None if ap is None or best_ap is None else ap >= best_ap[0],
          f"sapt-lora {_fmt(ap)}; best other: {best_ap[1]} {_fmt(best_ap[0])}" if best_ap else f"sapt-lora {_fmt(ap)}")
    least_fra = min(((v[1], n) for n, v in others.items() if v[1] is not None), default=None)
    judge("SAPT-LoRA has the lowest F.Ra of the continual methods",
          None if fra is None or least_fra is None else fra <= least_fra[0],
          f"sapt-lora {_fmt(fra)}; lowest other: {least_fra[1]} {_fmt(least_fra[0])}" if least_fra
          else f"sapt-lora {_fmt(fra)}")
    upper = _mean(summary, joint, "AP") if joint else None
    judge(f"SAPT-LoRA's AP is within {WITHIN_UPPER_BOUND:g} points of the multi-task upper bound or above it",
          None if ap is None or upper is None else ap >= upper - WITHIN_UPPER_BOUND,
          f"sapt-lora {_fmt(ap)}; {joint or 'upper bound'} {_fmt(upper)}")
    no_arm = _mean(summary, NO_ARM, "F.Ra")
    judge(f"without ARM, F.Ra is at least {NO_ARM_FORGETTING_RATIO:g}x SAPT-LoRA's",
          None if no_arm is None or fra is None else no_arm >= NO_ARM_FORGETTING_RATIO * fra,
          f"{NO_ARM} {_fmt(no_arm)}; sapt-lora {_fmt(fra)}")
    prompt_ap = _mean(summary, SAPT_PROMPT, "AP")
    best_prompt = max(((_mean(summary, n, "AP"), n) for n in OTHER_PROMPT_METHODS
                       if _mean(summary, n, "AP") is not None), default=None)
    judge("SAPT-Prompt has a higher AP than the other prompt methods",
          None if prompt_ap is None or best_prompt is None else prompt_ap > best_prompt[0],
          f"sapt-prompt {_fmt(prompt_ap)}; best other: {best_prompt[1]} {_fmt(best_prompt[0])}" if best_prompt
          else f"sapt-prompt {_fmt(prompt_ap)}")
    fwt = _mean(summary, SAPT_LORA, "FWT")
    judge("SAPT-LoRA's FWT against the single-task scores is above 0", None if fwt is None else fwt > 0,
          f"sapt-lora {_fmt(fwt)}")
    routing = _mean(summary, SAPT_LORA, "routing")
    claims.append(("SAPT-LoRA's routing accuracy (reported, no target)", "reported" if routing is not None
                   else "not measured", f"sapt-lora {_fmt(routing)}%"))
    return claims


def claims_markdown(summary: dict, methods: set[str]) -> str:
    lines = ["The paper's claims on this table (means over seeds):", "",
             "| claim | verdict | on |", "|---|---|---|"]
    lines += [f"| {claim} | {verdict} | {evidence} |" for claim, verdict, evidence in check_claims(summary, methods)]
    return "\n".join(lines) + "\n"
