# Stage 5, the initialized model: the base model saved with those rows and the remapped tokenizer.


rule init_model:
    input:
        rules="results/remap/remap_rules.yaml",
        tokenizer="results/tokenizer/remapped",
        embeddings="results/embeddings/reordered.safetensors",
        meta="results/embeddings/reordered.json",
        model=local_inputs(base_model()),
    output:
        directory("results/model/initialized"),
    log:
        "logs/init_model.log",
    benchmark:
        "benchmarks/init_model.tsv"
    conda:
        ENV
    params:
        script=script("init_model.py"),
        model=lambda wildcards: base_model(),
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --base-model {params.model:q} --embeddings {input.embeddings:q}"
        " --embeddings-meta {input.meta:q} --tokenizer {input.tokenizer:q} --rules {input.rules:q}"
        " {params.trust} --out {output:q} > {log:q} 2>&1"
