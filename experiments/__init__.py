"""Experiments run by `python -m experiments.main --config=configs/<name>.py` from the repository
root: the tg@pp sweep over the attention module, the kernel benchmarks, and token generation
through the whole model.

Each config's `kind` names the module below. A module has run(config, workdir, name, title)
(writes <name>.json and <name>.md, and <name>.png where it plots, into workdir), table(results)
(the markdown table the README shows), markdown(results) (the body of <name>.md) and plot
(a function (results, path), or None).
"""

EXPERIMENTS = {
    "tg_sweep": "experiments.sweep",
    "decode_kernels": "experiments.bench_decode",
    "batched_gemv": "experiments.bench_gemv",
    "cpu_decode": "experiments.bench_cpu_decode",
    "decode_step": "experiments.decode_step",
    "model_tg": "experiments.bench_model",
    "parallel_decode": "experiments.bench_parallel",
    "generate_text": "experiments.generate_text",
    "kernel_sweep": "experiments.kernel_sweep",
}
