//! `--model <repo id>` end to end: qwen-mk downloads a checkpoint with
//! hf-hub from a stand-in for the Hugging Face Hub (a small HTTP server on
//! localhost that answers as the Hub's `resolve` endpoint does), caches it
//! under HF_HOME, and then runs from the cache without the network, with
//! HF_HUB_OFFLINE too. The real Hub cannot be reached from CI; what this
//! checks is everything on qwen-mk's side of it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{ids, tiny_checkpoint};

const BIN: &str = env!("CARGO_BIN_EXE_qwen-mk");
const REPO: &str = "test-org/tiny-qwen3";
/// The commit the stand-in reports for every file (any 40 hex digits).
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Serves the files of `dir` as the Hub serves a model repo's files:
/// `GET /{REPO}/resolve/main/{file}` with a `Range: bytes=a-` or `bytes=a-b`
/// header answers 206 with the bytes, `Content-Range`, an `etag` and
/// `x-repo-commit` (hf-hub asks for byte 0 first to learn those, then for
/// the rest); anything else 404. Counts the requests it answers.
struct HubStandIn {
    endpoint: String,
    requests: Arc<AtomicUsize>,
}

impl HubStandIn {
    fn serve(dir: &Path) -> HubStandIn {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local port");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let (dir, count) = (dir.to_path_buf(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                // A failed answer shows up as the download's error in the test.
                let _ = answer(stream, &dir);
            }
        });
        HubStandIn { endpoint, requests }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

fn answer(mut stream: TcpStream, dir: &Path) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    let prefix = format!("/{REPO}/resolve/main/");
    let file = path
        .strip_prefix(&prefix)
        .filter(|name| !name.contains('/'))
        .map(|name| dir.join(name))
        .filter(|file| file.is_file());
    let (Some(file), Some(range)) = (file, range) else {
        return stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let bytes = std::fs::read(&file)?;
    let (first, last) = parse_range(&range, bytes.len());
    let body = &bytes[first..=last];
    // Any etag unique to the file: hf-hub names the cached blob by it.
    let etag = format!(
        "{}-{}",
        file.file_name().unwrap().to_string_lossy(),
        bytes.len()
    );
    let head = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {first}-{last}/{}\r\n\
         etag: \"{etag}\"\r\nx-repo-commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        body.len(),
        bytes.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)
}

/// `bytes=a-b` or `bytes=a-` of a file of `len` bytes, as inclusive bounds.
fn parse_range(range: &str, len: usize) -> (usize, usize) {
    let spec = range.strip_prefix("bytes=").expect("a byte range");
    let (first, last) = spec.split_once('-').expect("a byte range");
    let first: usize = first.parse().expect("a range start");
    let last = if last.is_empty() {
        len - 1
    } else {
        last.parse::<usize>().expect("a range end").min(len - 1)
    };
    (first, last)
}

fn generate(model: &str, hf_home: &Path, endpoint: Option<&str>, offline: bool) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(["generate", "--model", model, "--device", "cpu"])
        .args(["--prompt", "hello there", "--max-new-tokens", "4", "--json"])
        .env("HF_HOME", hf_home)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    // hf-hub's client takes a proxy from these, and would send the requests
    // for the stand-in on localhost there.
    for proxy in ["ALL_PROXY", "HTTP_PROXY", "HTTPS_PROXY"] {
        command.env_remove(proxy).env_remove(proxy.to_lowercase());
    }
    match endpoint {
        Some(endpoint) => command.env("HF_ENDPOINT", endpoint),
        // Nothing listens there: a run that tried the network would fail.
        None => command.env("HF_ENDPOINT", "http://127.0.0.1:9"),
    };
    if offline {
        command.env("HF_HUB_OFFLINE", "1");
    }
    command.output().expect("run qwen-mk")
}

fn generated_ids(out: &Output) -> Vec<u32> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("generate --json prints JSON");
    ids(&report["generated_ids"])
}

fn snapshot_dir(hf_home: &Path) -> PathBuf {
    hf_home
        .join("hub")
        .join(format!("models--{}", REPO.replace('/', "--")))
        .join("snapshots")
        .join(COMMIT)
}

#[test]
fn a_repo_id_is_downloaded_cached_and_then_run_offline() {
    let checkpoint = tiny_checkpoint(3, true);
    let hub = HubStandIn::serve(checkpoint.path());
    let hf_home = tempfile::tempdir().unwrap();
    let local = generated_ids(&generate(
        checkpoint.path().to_str().unwrap(),
        hf_home.path(),
        None,
        false,
    ));

    let downloaded = generated_ids(&generate(REPO, hf_home.path(), Some(&hub.endpoint), false));
    assert_eq!(
        downloaded, local,
        "the downloaded checkpoint runs as the directory does"
    );
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "model.safetensors",
    ] {
        let cached = std::fs::read(snapshot_dir(hf_home.path()).join(file))
            .expect("the file is in the cache");
        assert_eq!(
            cached,
            std::fs::read(checkpoint.path().join(file)).unwrap(),
            "{file}"
        );
    }
    let asked = hub.requests();
    assert!(asked >= 8, "two requests a file at least: {asked}");

    // Again: from the cache, without asking the Hub.
    let cached = generated_ids(&generate(REPO, hf_home.path(), Some(&hub.endpoint), false));
    assert_eq!(cached, local);
    assert_eq!(
        hub.requests(),
        asked,
        "a cached checkpoint is not downloaded again"
    );
    // And with HF_HUB_OFFLINE, no endpoint at all.
    let offline = generated_ids(&generate(REPO, hf_home.path(), None, true));
    assert_eq!(offline, local);
}

#[test]
fn offline_without_the_files_names_what_is_missing() {
    let hf_home = tempfile::tempdir().unwrap();
    let out = generate(REPO, hf_home.path(), None, true);
    common::assert_one_line_error(&out, "HF_HUB_OFFLINE is set and config.json of test-org/tiny-qwen3 is not in the Hugging Face cache");
}

#[test]
fn a_repo_the_hub_does_not_have_is_one_line() {
    let empty = tempfile::tempdir().unwrap();
    let hub = HubStandIn::serve(empty.path());
    let hf_home = tempfile::tempdir().unwrap();
    let out = generate(REPO, hf_home.path(), Some(&hub.endpoint), false);
    common::assert_one_line_error(&out, "cannot download config.json of test-org/tiny-qwen3");
}
