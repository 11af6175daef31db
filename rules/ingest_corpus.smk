# Stage 1a, the cleaned corpus: documents read, normalised, deduplicated and split (train / dev / held-out).


rule ingest_corpus:
    input:
        corpus_inputs,
    output:
        train="results/corpus/{corpus}/train.jsonl",
        dev="results/corpus/{corpus}/dev.jsonl",
        heldout="results/corpus/{corpus}/heldout.jsonl",
        stats="results/corpus/{corpus}/ingest.json",
    log:
        "logs/ingest_corpus/{corpus}.log",
    benchmark:
        "benchmarks/ingest_corpus/{corpus}.tsv"
    conda:
        ENV
    params:
        script=script("ingest_corpus.py"),
        source=corpus_source_args,
        opts=lambda wildcards: corpus_config(wildcards.corpus),
    shell:
        "python {params.script:q} {params.source}"
        " --format {params.opts[format]} --txt-mode {params.opts[txt_mode]}"
        " --text-key {params.opts[text_key]:q} --text-column {params.opts[text_column]:q}"
        " --max-document-bytes {params.opts[max_document_bytes]} --max-documents {params.opts[max_documents]}"
        " --heldout-fraction {params.opts[heldout_fraction]} --dev-fraction {params.opts[dev_fraction]}"
        " --seed {params.opts[seed]} --train-out {output.train:q} --dev-out {output.dev:q} --heldout-out {output.heldout:q} --stats-out {output.stats:q}"
        " > {log:q} 2>&1"
