#!/bin/sh
# Entrypoint of the medmamba image (docker/Dockerfile). Also runs outside a container: every path is an
# environment variable (INPUT_DIR=/input, OUTPUT_DIR=/output, MODEL_DIR=/model, REF_DIR=/reference) and the CLI
# is $MEDMAMBA (default: medmamba).
#
#   run [ARGS]       (default) predict INPUT_DIR -> OUTPUT_DIR/segmentations; then, when REF_DIR holds NIfTI
#                    references, evaluate them -> OUTPUT_DIR/evaluation (summary.json, metrics.csv, report.html).
#                    ARGS go to `medmamba predict` (e.g. --device cpu, --overwrite).
#   predict [ARGS]   only the prediction step
#   evaluate [ARGS]  only the evaluation step (of OUTPUT_DIR/segmentations against REF_DIR)
#   anything else    passed to the medmamba CLI as is (e.g. `check`, `--help`)
#
# Exit status: that of the failing step (1: some case failed or was refused, 2: usage/set-up error), else 0.
set -eu

INPUT_DIR="${INPUT_DIR:-/input}"
OUTPUT_DIR="${OUTPUT_DIR:-/output}"
MODEL_DIR="${MODEL_DIR:-/model}"
REF_DIR="${REF_DIR:-/reference}"
MEDMAMBA="${MEDMAMBA:-medmamba}"
SEG_DIR="${OUTPUT_DIR}/segmentations"
EVAL_DIR="${OUTPUT_DIR}/evaluation"

die() {
    echo "medmamba-entrypoint: error: $*" >&2
    exit 2
}

has_nifti() {
    [ -d "$1" ] && [ -n "$(find -L "$1" -maxdepth 1 \( -name '*.nii.gz' -o -name '*.nii' \) -print -quit 2>/dev/null)" ]
}

check_output() {
    mkdir -p "$OUTPUT_DIR" 2>/dev/null || die "cannot create output folder $OUTPUT_DIR (mount a writable folder at /output)"
    probe="$OUTPUT_DIR/.medmamba_write_test.$$"
    if ! (: > "$probe") 2>/dev/null; then
        die "output folder $OUTPUT_DIR is not writable by uid $(id -u) (mount it read-write, or run with --user)"
    fi
    rm -f "$probe"
}

predict() {
    [ -d "$INPUT_DIR" ] || die "input folder $INPUT_DIR does not exist (mount the scans at /input:ro)"
    [ -r "$INPUT_DIR" ] || die "input folder $INPUT_DIR is not readable by uid $(id -u)"
    [ -d "$MODEL_DIR" ] && [ -n "$(ls -A "$MODEL_DIR" 2>/dev/null)" ] \
        || die "no model in $MODEL_DIR (mount a MONAI bundle or an nnU-Net results folder at /model:ro)"
    check_output
    "$MEDMAMBA" predict --model "$MODEL_DIR" --input "$INPUT_DIR" --output "$SEG_DIR" "$@"
}

evaluate() {
    has_nifti "$REF_DIR" || die "no reference NIfTI files in $REF_DIR (mount them at /reference:ro)"
    check_output
    "$MEDMAMBA" evaluate --pred "$SEG_DIR" --ref "$REF_DIR" --out "$EVAL_DIR" "$@"
}

cmd="${1:-run}"
[ $# -gt 0 ] && shift

case "$cmd" in
    run)
        status=0
        predict "$@" || status=$?
        [ "$status" -eq 2 ] && exit 2
        if has_nifti "$REF_DIR"; then
            estatus=0
            evaluate --overwrite || estatus=$?
            [ "$estatus" -gt "$status" ] && status=$estatus
        else
            echo "medmamba-entrypoint: no references in $REF_DIR: evaluation skipped" >&2
        fi
        exit "$status"
        ;;
    predict)
        predict "$@"
        ;;
    evaluate)
        evaluate "$@"
        ;;
    *)
        exec "$MEDMAMBA" "$cmd" "$@"
        ;;
esac
