"""Research-only code, never imported by the runtime (patching, policies, attention, kernels): the project-trained
digits VLM, TPLA's error tables on structured latents, random MLA model configs (no MLA weights install here) and
TPLA's timing helpers. The CLI and the benchmarks in ``bench/`` use them."""
