#!/usr/bin/env bash
# One whole round on the device machine (it has torch + transformers, no
# cargo): write the synthetic checkpoints, make the transformers references,
# run parity and bench with the release binary built on the dev machine.
#
#   usage (from the repo root, binary carried in .device/):
#     bash scripts/device_round.sh [steps...]      steps: synth smoke ref-tiny ref ref-long ref-9k ref-prefill parity parity-long parity-9k grids parity-continue parity-prefill generate chat heads bench bench-max variants peers peers-prefill
#   One log ($OUT/round.log) and a few JSON files go to $OUT (or
#   /tmp/qwen-mk-out): the device tool returns at most 8 files.
set -uo pipefail
BIN=${BIN:-.device/qwen-mk}
OUT=${OUT:-/tmp/qwen-mk-out}
M06=models/synth-0.6b
TINY=models/synth-tiny
mkdir -p "$OUT" models
export PYTHONUNBUFFERED=1
# cuBLAS (batched prefill) comes with the device's PyTorch wheels.
cublas=$(python3 -c 'import glob, site; print(*[h for p in site.getsitepackages() for h in sorted(glob.glob(p + "/nvidia/*/lib/libcublas.so.*"))][:1])')
[ -n "$cublas" ] && export LD_LIBRARY_PATH="$(dirname "$cublas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "cuBLAS: ${cublas:-not found}"
# Prompt lengths of the prefill parity checks: none a multiple of a tile.
PREFILL_LENGTHS=(1 7 129 1000 4097)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(synth smoke ref-tiny ref parity generate bench)

run() { # name, timeout seconds, command...
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > >(tee "$OUT/$name.out") 2>&1
    local rc=$?
    cat "$OUT/$name.out" >> "$OUT/round.log"
    rm -f "$OUT/$name.out"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/round.log"
    summary+=("$name $rc $((SECONDS - t0))")
}

summary=()
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$OUT/round.log"
echo "commit $(cat .device/COMMIT 2>/dev/null)" | tee -a "$OUT/round.log"
for step in "${steps[@]}"; do
    case $step in
    synth)
        run synth-0.6b 120 "$BIN" synth --out $M06 --shape 0.6b --seed 1
        run synth-tiny 60 "$BIN" synth --out $TINY --shape tiny --seed 1 ;;
    smoke)
        # A few steps first: a hang or crash here stops the round early.
        run smoke 90 "$BIN" bench --model $M06 --positions 0,100 --steps 4 --repeats 1 || true
        case "${summary[-1]}" in "smoke 0 "*) ;; *) echo "smoke test failed: stopping"; break ;; esac ;;
    ref-tiny)
        run ref-tiny 300 python3 reference/make_reference.py --model $TINY --out "$OUT/tiny-tokens.json" --steps 32 ;;
    ref)
        run ref 400 python3 reference/make_reference.py --model $M06 --out "$OUT/tokens.json" --steps 128 ;;
    ref-long)
        run ref-long 500 python3 reference/make_reference.py --model $M06 --out "$OUT/tokens-long.json" --steps 128 --prompt-ids-len 4100 ;;
    ref-9k)
        run ref-9k 500 python3 reference/make_reference.py --model $M06 --out "$OUT/tokens-9k.json" --steps 64 --prompt-ids-len 9000 ;;
    ref-prefill)
        # References at prompt lengths that are no multiple of any tile (16 steps each).
        mkdir -p "$OUT/prefill-refs"
        for n in "${PREFILL_LENGTHS[@]}"; do
            run "ref-prefill-$n" 300 python3 reference/make_reference.py --model $M06 \
                --out "$OUT/prefill-refs/tokens-prefill-$n.json" --steps 16 --prompt-ids-len "$n"
        done
        PREFILL_REFS="$OUT/prefill-refs" ;;  # parity-prefill uses these
    parity)
        run parity 300 "$BIN" parity --ref "${REF:-reference/tokens.json}" --model $M06 --json "$OUT/parity.json"
        run parity-token-by-token 300 "$BIN" parity --ref "${REF:-reference/tokens.json}" --model $M06 --token-by-token ;;
    parity-long)
        run parity-long 400 "$BIN" parity --ref "${REF_LONG:-reference/tokens-long.json}" --model $M06 --json "$OUT/parity-long.json"
        run parity-long-token-by-token 400 "$BIN" parity --ref "${REF_LONG:-reference/tokens-long.json}" --model $M06 --token-by-token ;;
    parity-9k)
        # Chunks longer than the decode kernel's warps: several tiles a warp.
        run parity-9k 400 "$BIN" parity --ref "${REF_9K:-reference/tokens-9k.json}" --model $M06
        run parity-9k-token-by-token 400 "$BIN" parity --ref "${REF_9K:-reference/tokens-9k.json}" --model $M06 --token-by-token ;;
    grids)
        # The decode kernel on fewer blocks than this GPU has SMs (QWEN_MK_DECODE_BLOCKS): the
        # fewest it runs on with Hopper's 16 ring slots (32: src/gpu/decoder/grid.rs), and sizes
        # whose attention splits differ from 132's (66, 100, 131).
        # Token by token through the 4,100-token reference: every cache length up to 4,228.
        for blocks in 32 66 100 131; do
            run "parity-grid-$blocks" 300 env QWEN_MK_DECODE_BLOCKS=$blocks "$BIN" parity --ref "${REF:-reference/tokens.json}" --model $M06
            run "parity-long-grid-$blocks-token-by-token" 400 env QWEN_MK_DECODE_BLOCKS=$blocks "$BIN" parity --ref "${REF_LONG:-reference/tokens-long.json}" --model $M06 --token-by-token
        done ;;
    parity-continue)
        # The long reference's last 14 or 500 tokens in a second prefill that continues the cache
        # (a chat turn after a long conversation: attention split over the keys, 16 and 2 ways on an H200).
        for n in 14 500; do
            run "parity-continue-$n" 400 "$BIN" parity --ref "${REF_LONG:-reference/tokens-long.json}" --model $M06 --last-prefill $n
        done ;;
    parity-prefill)
        # Batched prefill and the token-by-token path on every prefill reference.
        for n in "${PREFILL_LENGTHS[@]}"; do
            ref=${PREFILL_REFS:-reference}/tokens-prefill-$n.json
            run "parity-prefill-$n" 200 "$BIN" parity --ref "$ref" --model $M06
            run "parity-prefill-$n-token-by-token" 200 "$BIN" parity --ref "$ref" --model $M06 --token-by-token
        done ;;
    generate)
        # Streams on the GPU; greedy ids must equal the float32 truth's up to its first near-tie.
        ref=${REF:-reference/tokens.json}
        prompt=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["prompt"], end="")' "$ref")
        run generate 90 "$BIN" generate --model $M06 --prompt "$prompt" --max-new-tokens 128 --ignore-eos
        "$BIN" generate --model $M06 --prompt "$prompt" --max-new-tokens 128 --ignore-eos --json > "$OUT/generate.json"
        run generate-check 30 python3 scripts/check_generate.py truth "$ref" "$OUT/generate.json" ;;
    chat)
        # A conversation, greedy: a message, another, /clear, the first again (check_generate.py chat).
        q="What is the capital of France?"
        # Both ways of feeding a turn's new tokens (batched prefill, one at a time).
        for way in "" --token-by-token; do
            printf '%s\nTell me more.\n/clear\n%s\n' "$q" "$q" | "$BIN" chat --model $M06 --json --temperature 0 --max-new-tokens 32 $way > /tmp/chat.jsonl
            "$BIN" generate --model $M06 --chat --prompt "$q" --max-new-tokens 32 --json $way > /tmp/chat-generate.json
            run "check-chat${way}" 30 python3 scripts/check_generate.py chat /tmp/chat.jsonl /tmp/chat-generate.json
        done ;;
    heads)
        # The argmax test heads: an EOS id must win (and stop generation); all-ties must give id 0.
        run synth-eos 120 "$BIN" synth --out models/eos-wins --shape 0.6b --head eos-wins
        "$BIN" generate --model models/eos-wins --prompt "Hello" --max-new-tokens 8 --json > /tmp/eos.json
        run check-eos 30 python3 scripts/check_generate.py eos /tmp/eos.json
        rm -rf models/eos-wins
        run synth-ties 120 "$BIN" synth --out models/all-ties --shape 0.6b --head all-ties
        "$BIN" generate --model models/all-ties --prompt "Hello" --max-new-tokens 4 --json > /tmp/ties.json
        run check-ties 30 python3 scripts/check_generate.py zeros /tmp/ties.json
        rm -rf models/all-ties ;;
    bench)
        run bench 240 "$BIN" bench --model $M06 --profile ;;
    bench-max)
        # The last positions of the model's 40,960-token context.
        run bench-max 240 "$BIN" bench --model $M06 --positions 40700 --steps 256 --repeats 2 ;;
    variants)
        # Every other binary carried in .device/ (qwen-mk-<name>), timed in the
        # same run as the main one: before/after comparisons on one machine.
        for other in .device/qwen-mk-*; do
            run "parity-${other#.device/qwen-mk-}" 120 "$other" parity --ref reference/tokens.json --model $M06
            run "bench-${other#.device/qwen-mk-}" 120 "$other" bench --model $M06 --positions 0,4096
        done
        run bench-main 120 "$BIN" bench --model $M06 --positions 0,4096 ;;
    peers)
        run peers 400 python3 benches/peers.py --model $M06 --json "$OUT/peers.json" ;;
    peers-prefill)
        # transformers (sdpa, bf16) time to first token, beside qwen-mk's.
        run peers-prefill 300 python3 benches/peers.py --model $M06 --prefill-lengths 1024,4096,8192 --json "$OUT/peers-prefill.json"
        run bench-prefill 200 "$BIN" bench --model $M06 --positions 0 --steps 16 --repeats 5 --prefill-lengths 1,7,129,1000,1024,4096,4097,8192 ;;
    *) echo "unknown step $step" ;;
    esac
done
# The device tool returns few files: the new references go back as one archive.
if [ -d "$OUT/prefill-refs" ]; then
    tar -C "$OUT" -czf "$OUT/prefill-refs.tgz" prefill-refs && rm -rf "$OUT/prefill-refs"
fi
printf '%s\n' "${summary[@]}" | tee -a "$OUT/round.log"
