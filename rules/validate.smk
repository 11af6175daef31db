# Stage 7, the validation report on held-out text.


rule validate:
    input:
        unpack(validate_inputs),
    output:
        json="results/report/validation.json",
        html="results/report/validation.html",
    log:
        "logs/validate.log",
    benchmark:
        "benchmarks/validate.tsv"
    conda:
        ENV
    threads: config["validation"]["threads"]
    params:
        script=script("validate.py"),
        base=lambda wildcards: base_model(),
        extra=validate_args,
        opts=config["validation"],
        gates=json.dumps(config["validation"]["gates"], sort_keys=True),
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "OMP_NUM_THREADS={threads} python {params.script:q} --heldout {input.heldout:q} {params.extra}"
        " --base-model {params.base:q} --initialized {input.initialized:q} --sft {input.sft:q}"
        " --max-documents {params.opts[max_documents]} --byte-budget {params.opts[byte_budget]}"
        " --batch-size {params.opts[batch_size]} --prompts {params.opts[prompts]}"
        " --prompt-bytes {params.opts[prompt_bytes]} --new-tokens {params.opts[new_tokens]}"
        " --gates {params.gates:q} {params.trust}"
        " --out-json {output.json:q} --out-html {output.html:q} > {log:q} 2>&1"
