# Stage 8, results/final_model, written only when every gate of the report passes.


rule finalize_model:
    input:
        validation="results/report/validation.json",
        report="results/report/validation.html",
        model="results/model/sft",
        rules="results/remap/remap_rules.yaml",
        base=local_inputs(base_model()),
    output:
        directory("results/final_model"),
    log:
        "logs/finalize_model.log",
    benchmark:
        "benchmarks/finalize_model.tsv"
    conda:
        ENV
    params:
        script=script("finalize_model.py"),
        base=lambda wildcards: base_model(),
        config=json.dumps(config, sort_keys=True),
        inputs=lambda wildcards: " ".join(
            shlex.quote(p) for p in final_model_checksummed_inputs()
        ),
    shell:
        "python {params.script:q} --model {input.model:q} --validation {input.validation:q}"
        " --rules {input.rules:q} --base-model {params.base:q} --config {params.config:q}"
        " --inputs {params.inputs} --out {output:q} > {log:q} 2>&1"
