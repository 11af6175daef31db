# Stage 1, the analyzed corpus: ingest (clean, deduplicate, split) and analysis with the base tokenizer.


rule ingest_corpus:
    input:
        corpus_inputs,
    output:
        train="results/corpus/{corpus}/train.jsonl",
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
        paths=lambda wildcards: corpus_config(wildcards.corpus)["paths"],
        opts=lambda wildcards: corpus_config(wildcards.corpus),
    shell:
        "python {params.script:q} {params.paths:q}"
        " --format {params.opts[format]} --txt-mode {params.opts[txt_mode]}"
        " --text-key {params.opts[text_key]:q} --text-column {params.opts[text_column]:q}"
        " --max-document-bytes {params.opts[max_document_bytes]} --max-documents {params.opts[max_documents]}"
        " --heldout-fraction {params.opts[heldout_fraction]} --seed {params.opts[seed]}"
        " --train-out {output.train:q} --heldout-out {output.heldout:q} --stats-out {output.stats:q}"
        " > {log:q} 2>&1"


rule analyze_corpus:
    input:
        unpack(
            lambda wildcards: {
                "train": "results/corpus/domain/train.jsonl",
                "heldout": "results/corpus/domain/heldout.jsonl",
                "tokenizer": local_inputs(base_tokenizer()),
                **(
                    {
                        "general_train": "results/corpus/general/train.jsonl",
                        "general_heldout": "results/corpus/general/heldout.jsonl",
                    }
                    if has_general()
                    else {}
                ),
            }
        ),
    output:
        frequencies="results/analysis/token_frequencies.parquet",
        pretokens="results/analysis/pretokens.parquet",
        ids="results/analysis/train_ids.bin",
        offsets="results/analysis/train_offsets.npy",
        ids_meta="results/analysis/train_ids.json",
        stats="results/analysis/corpus_stats.json",
    log:
        "logs/analyze_corpus.log",
    benchmark:
        "benchmarks/analyze_corpus.tsv"
    conda:
        ENV
    threads: config["analysis"]["threads"]
    params:
        script=script("analyze_corpus.py"),
        tokenizer=base_tokenizer(),
        general=general_split_args,
        exact="--exact-pretokenizer" if config["analysis"]["exact_pretokenizer"] else "",
        trust="--trust-remote-code" if config["trust_remote_code"] else "",
    shell:
        "python {params.script:q} --tokenizer {params.tokenizer:q}"
        " --train {input.train:q} --heldout {input.heldout:q} {params.general}"
        " --out-dir results/analysis --threads {threads} {params.exact} {params.trust} > {log:q} 2>&1"
