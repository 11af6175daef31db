# A base model given as a .gguf file, converted once into a Hugging Face folder under resources/models/.


rule gguf_to_hf:
    input:
        lambda wildcards: asset_folder(config["base_model"]),
    output:
        directory("resources/models/{model}"),
    log:
        "logs/gguf_to_hf/{model}.log",
    benchmark:
        "benchmarks/gguf_to_hf/{model}.tsv"
    conda:
        ENV
    params:
        script=script("gguf_to_hf.py"),
        gguf=config["base_model"],
    shell:
        "python {params.script:q} {params.gguf:q} --out {output:q} > {log:q} 2>&1"
