//! A backend reuses the cached keys and values of the positions where a new
//! prompt begins as the last sequence did (a chat's earlier turns), and what
//! it generates is what a fresh backend generates from the whole prompt.
//! CPU backend: its forward is the same arithmetic for a position whether
//! the position was computed now or in an earlier call.

mod common;

use qwen_mk::backend::Backend;
use qwen_mk::checkpoint::Checkpoint;
use qwen_mk::cli::DeviceKind;
use qwen_mk::sampling::Sampling;

const CONTEXT: usize = 96;

fn open(checkpoint: &Checkpoint, sampling: Option<Sampling>) -> Backend {
    Backend::open(checkpoint, DeviceKind::Cpu, 0, CONTEXT, sampling, true).unwrap()
}

/// (generated ids, positions reused) of one `generate` call.
fn run(backend: &mut Backend, prompt: &[u32], max_new: usize) -> (Vec<u32>, usize) {
    let mut ids = Vec::new();
    let timings = backend
        .generate(prompt, max_new, &[], |t| {
            ids.push(t);
            Ok(())
        })
        .unwrap();
    (ids, timings.reused_tokens)
}

fn check(sampling: Option<Sampling>) {
    let dir = common::tiny_checkpoint(3, true);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let mut backend = open(&checkpoint, sampling);
    let fresh = |prompt: &[u32], max_new| run(&mut open(&checkpoint, sampling), prompt, max_new);

    let first: Vec<u32> = vec![5, 17, 250, 3, 99, 42, 7];
    let (answer, reused) = run(&mut backend, &first, 6);
    assert_eq!(reused, 0);
    assert_eq!(answer.len(), 6);

    // The next turn: the whole first sequence, its answer, then more.
    let mut second = first.clone();
    second.extend_from_slice(&answer);
    second.extend_from_slice(&[11, 12, 13]);
    let (continued, reused) = run(&mut backend, &second, 5);
    // Every position but the answer's last token was computed before.
    assert_eq!(reused, first.len() + answer.len() - 1);
    assert_eq!(continued, fresh(&second, 5).0);

    // A prompt that leaves the cached sequence part way: only its shared
    // beginning is reused.
    let mut third = second[..4].to_vec();
    third.extend_from_slice(&[60, 61, 62, 63]);
    let (branched, reused) = run(&mut backend, &third, 5);
    assert_eq!(reused, 4);
    assert_eq!(branched, fresh(&third, 5).0);

    // The same prompt again: all of it but the last position, whose logits
    // give the first token, comes from the cache.
    let (again, reused) = run(&mut backend, &third, 5);
    assert_eq!(reused, third.len() - 1);
    assert_eq!(again, branched);

    // A prompt the cache shares nothing with.
    let (other, reused) = run(&mut backend, &[8, 9], 3);
    assert_eq!(reused, 0);
    assert_eq!(other, fresh(&[8, 9], 3).0);
}

#[test]
fn greedy_continuations_equal_a_fresh_run() {
    check(None);
}

#[test]
fn sampled_continuations_equal_a_fresh_run() {
    // The draws are numbered by position, so a reused prefix leaves them
    // where a fresh run has them.
    check(Some(Sampling {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.95,
        seed: 7,
    }));
}
