# Stage 4, the initialized model: reassigned embedding rows initialised from the new tokens'
# base segmentations, then the base model saved with those rows and the remapped tokenizer.


rule reorder_embeddings:
    input:
        rules="results/remap/remap_rules.yaml",
        model=local_inputs(base_model()),
    output:
        embeddings="results/embeddings/reordered.safetensors",
        meta="results/embeddings/reordered.json",
    log:
        "logs/reorder_embeddings.log",
    benchmark:
        "benchmarks/reorder_embeddings.tsv"
    conda:
        ENV
    params:
        script=script("reorder_embeddings.py"),
        model=lambda wildcards: base_model(),
        opts=config["embeddings"],
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --base-model {params.model:q} --rules {input.rules:q}"
        " --strategy {params.opts[strategy]} --seed {params.opts[seed]}"
        " --weighted-ratio {params.opts[weighted_ratio]} --tied-weighted {params.opts[tied_weighted]}"
        " --random-scale {params.opts[random_scale]} {params.trust} --out {output.embeddings:q} --meta-out {output.meta:q} > {log:q} 2>&1"


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
