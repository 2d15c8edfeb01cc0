//! End-to-end tests of `trainer` inside a SageMaker training job, without
//! Docker or AWS: a temp dir stands in for /opt/ml (`SAGEMAKER_BASE_DIR`),
//! with the job's settings files and channels of KJV shards, and the image's
//! default config points at the tiny "test" model. What SageMaker would do to
//! the container (run `train`, send SIGTERM) the tests do to the process.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{mpi_available, prepare_kjv_shards, repo_root, stderr, stdout};
use regex::Regex;

/// llm.c shards of the start of the KJV corpus, made once per test.
struct Shards {
    dir: tempfile::TempDir,
}

impl Shards {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        prepare_kjv_shards(dir.path(), 120_000, 4096);
        Shards { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join("shards").join(name)
    }
}

/// The image's default config in these tests: a tiny model, a few steps
/// (scripts/test-image.sh runs the same job inside the image).
const IMAGE_CONFIG: &str = include_str!("fixtures/sagemaker-job.toml");

/// A fake SageMaker job: `ml/` is /opt/ml, `image/` the image's files,
/// `work/` the container's working directory.
struct Job {
    dir: tempfile::TempDir,
}

impl Job {
    fn new(shards: &Shards, hyperparameters: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let job = Job { dir };
        let config = job.base().join("input/config");
        fs::create_dir_all(&config).unwrap();
        fs::write(config.join("hyperparameters.json"), hyperparameters).unwrap();
        fs::write(
            config.join("inputdataconfig.json"),
            r#"{"train": {"TrainingInputMode": "File", "S3DistributionType": "FullyReplicated", "RecordWrapperType": "None"},
                "validation": {"TrainingInputMode": "FastFile", "S3DistributionType": "FullyReplicated"}}"#,
        )
        .unwrap();
        job.set_hosts("algo-1", &["algo-1"]);
        for (channel, shard) in [("train", "train_000000.bin"), ("validation", "val_000000.bin")] {
            let d = job.base().join("input/data").join(channel);
            fs::create_dir_all(&d).unwrap();
            fs::copy(shards.file(shard), d.join(shard)).unwrap();
        }
        fs::create_dir_all(job.path("image/configs")).unwrap();
        fs::write(job.path("image/configs/job.toml"), IMAGE_CONFIG).unwrap();
        fs::create_dir_all(job.path("work")).unwrap();
        job
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn base(&self) -> PathBuf {
        self.path("ml")
    }

    fn set_hosts(&self, current: &str, hosts: &[&str]) {
        let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
        fs::write(
            self.base().join("input/config/resourceconfig.json"),
            format!(
                r#"{{"current_host": "{current}", "current_instance_type": "ml.p4d.24xlarge",
                    "hosts": [{}], "network_interface_name": "eth0",
                    "instance_groups": [{{"instance_group_name": "homogeneousCluster", "hosts": [{}]}}]}}"#,
                hosts.join(", "),
                hosts.join(", ")
            ),
        )
        .unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_trainer"));
        c.args(args)
            .current_dir(self.path("work"))
            .env("SAGEMAKER_BASE_DIR", self.base())
            .env("TRAINER_SAGEMAKER_CONFIG", self.path("image/configs/job.toml"))
            .env("TRAINER_SAGEMAKER_DONE_FILE", self.path("done"))
            .env_remove("TRAINER_SAGEMAKER_RANK")
            .env_remove("TRAINER_SAGEMAKER_TEST_PANIC");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    fn failure(&self) -> Option<String> {
        fs::read_to_string(self.base().join("output/failure")).ok()
    }

    /// Every file under /opt/ml outside input/, relative to it, sorted.
    fn outputs(&self) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, base, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.base(), &self.base(), &mut out);
        out.retain(|p| !p.starts_with("input/"));
        out.sort();
        out
    }
}

/// The step lines, also those of ranks under `mpirun --tag-output` ("[1,0]<stdout>:step=...").
fn train_lines(out: &str) -> Vec<&str> {
    out.lines()
        .map(|l| l.split_once(">:").filter(|(tag, _)| tag.starts_with('[')).map_or(l, |(_, rest)| rest))
        .filter(|l| l.starts_with("step=") && l.contains("train_loss="))
        .collect()
}

/// The model directory is what transformers' `from_pretrained` reads (a
/// GPT-2 config.json beside model.safetensors), and `trainer eval` reads it too.
fn assert_hf_model(dir: &Path) {
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2", "{config}");
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel", "{config}");
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let wte = st.tensor("transformer.wte.weight").unwrap();
    assert_eq!(wte.shape()[0], config["vocab_size"].as_u64().unwrap() as usize, "the real vocabulary, not padded");
}

/// Asserts a clean failure: the exit code, one `error:` line on stderr, and
/// the same reason in the failure file.
fn assert_failed(job: &Job, o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning: ")).collect();
    assert_eq!(lines.len(), 1, "one line: {err:?}");
    let reason = lines[0].strip_prefix("error: ").unwrap_or_else(|| panic!("{err}"));
    for n in needles {
        assert!(reason.contains(n), "{reason:?} lacks {n:?}");
    }
    let failure = job.failure().expect("a failure file");
    assert!(failure.len() <= 1024);
    assert_eq!(failure, reason, "the failure file holds the error line");
    reason.to_string()
}

#[test]
fn trains_from_the_job_settings_and_writes_only_where_sagemaker_reads() {
    let shards = Shards::new();
    let job = Job::new(
        &shards,
        r#"{"training.max_steps": "\"6\"", "optimizer.lr": "0.005", "training.seed": "11",
            "logging.run_dir": "elsewhere", "sagemaker_program": "\"train.py\"",
            "sagemaker_region": "\"us-east-1\"", "_tuning_objective_metric": "val_loss"}"#,
    );
    let o = job.run(&["train"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    for note in [
        "sagemaker: ignoring hyperparameter _tuning_objective_metric",
        "sagemaker: ignoring hyperparameter sagemaker_program",
        "sagemaker: ignoring hyperparameter logging.run_dir",
        "role=Leader",
    ] {
        assert!(out.contains(note), "{note:?} in {out}");
    }
    assert_eq!(train_lines(&out).len(), 6, "{out}");
    // The final checkpoint goes to the checkpoint directory, which SageMaker
    // syncs to checkpoint_s3_uri.
    assert_eq!(
        job.outputs(),
        [
            "checkpoints/step_00000006/manifest.json",
            "checkpoints/step_00000006/model.safetensors",
            "checkpoints/step_00000006/optim_rank00000.safetensors",
            "model/config.json",
            "model/model.safetensors",
            "model/trainer.toml",
            "output/data/metrics.jsonl",
            "output/data/report.png"
        ],
        "outputs only where SageMaker collects them"
    );
    assert_eq!(fs::read_dir(job.path("work")).unwrap().count(), 0, "nothing in the working directory");
    assert_eq!(job.failure(), None);
    assert_hf_model(&job.base().join("model"));
    let used = fs::read_to_string(job.base().join("model/trainer.toml")).unwrap();
    for line in
        ["max_steps = 6", "lr = 0.005", "seed = 11", "input/data/train/**/*.bin", "input/data/validation/**/*.bin"]
    {
        assert!(used.contains(line), "{line:?} in {used}");
    }
    let metrics = fs::read_to_string(job.base().join("output/data/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 8, "6 steps + 2 evaluations");

    // ContainerEntrypoint set to the bare trainer: no `train` argument. (A new
    // job: checkpoints left in the directory would mean resuming the finished run.)
    let fresh = || fs::remove_dir_all(job.base().join("checkpoints")).unwrap();
    fresh();
    let o = job.run(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(train_lines(&stdout(&o)).len(), 6);
    // ContainerArguments with --set: applied after the hyperparameters.
    fresh();
    let o = job.run(&["train", "--set", "training.max_steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(train_lines(&stdout(&o)).len(), 2);
}

/// A ViT job: image shards (with classes.txt) in the train and validation
/// channels train the image's config; the model directory holds a
/// ViTForImageClassification whose id2label comes from classes.txt.
#[test]
fn an_image_classifier_trains_from_image_channels() {
    let shards = Shards::new();
    let job = Job::new(&shards, r#"{"training.max_steps": "4"}"#);
    let shape = trainer_data::ImageShape { height: 8, width: 8, channels: 1 };
    for (channel, file, n) in [("train", "train_000000.img", 64u32), ("validation", "val_000000.img", 16)] {
        let d = job.base().join("input/data").join(channel);
        fs::remove_dir_all(&d).unwrap();
        fs::create_dir_all(&d).unwrap();
        let pixels: Vec<u8> = (0..n * 64).map(|i| (i * 37 % 251) as u8).collect();
        let labels: Vec<u32> = (0..n).map(|i| i % 3).collect();
        trainer_data::write_image_shard(&d.join(file), shape, 3, &pixels, &labels).unwrap();
    }
    fs::write(job.base().join("input/data/train/classes.txt"), "hat\nshoe\nbag\n").unwrap();
    fs::write(
        job.path("image/configs/job.toml"),
        r#"
[model]
kind = "vit"
image_size = 8
patch_size = 4
channels = 1
num_classes = 3
n_layer = 1
n_head = 2
n_embd = 16

[data]
train = "/nonexistent/train_*.img"

[training]
micro_batch_size = 8
max_steps = 30

[logging]
interval = 1

[eval]
interval = 0
batches = 2
"#,
    )
    .unwrap();
    let o = job.run(&["train"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    assert_eq!(train_lines(&out).len(), 4, "{out}");
    assert!(train_lines(&out).iter().all(|l| l.contains("img_per_s=")), "{out}");
    assert!(out.contains("val_acc="), "{out}");
    let model = job.base().join("model");
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "ViTForImageClassification", "{config}");
    assert_eq!(config["id2label"]["2"], "bag", "{config}");
    assert!(model.join("preprocessor_config.json").is_file() && model.join("trainer.toml").is_file());
}

#[test]
fn serve_is_refused() {
    let shards = Shards::new();
    let job = Job::new(&shards, "{}");
    assert_failed(&job, &job.run(&["serve"]), &["`serve` is not supported", "train"]);
}

#[test]
fn errors_leave_their_reason_in_the_failure_file() {
    let shards = Shards::new();
    let cases: &[(&str, &[&str])] = &[
        (r#"{"optimizer.lrx": "1"}"#, &["optimizer.lrx", "unknown field"]),
        (r#"{"optimizer.lr": "-1"}"#, &["optimizer.lr = -1", "> 0"]),
        (r#"{"training.device": "\"tpu\""}"#, &["training.device", "tpu"]),
        (r#"{"lr": "1"}"#, &["hyperparameter lr", "section.key"]),
        (r#"{"config": "nope.toml"}"#, &["hyperparameter config = \"nope.toml\"", "no such file"]),
        (r#"{"processes_per_host": "0"}"#, &["processes_per_host"]),
        ("not json", &["hyperparameters.json"]),
    ];
    for (hp, needles) in cases {
        let job = Job::new(&shards, hp);
        assert_failed(&job, &job.run(&["train"]), needles);
        assert!(!job.base().join("model/model.safetensors").exists());
    }

    // An empty train channel, then a missing one (inputdataconfig.json declares it).
    let job = Job::new(&shards, "{}");
    let train = job.base().join("input/data/train");
    fs::remove_file(train.join("train_000000.bin")).unwrap();
    let reason = assert_failed(&job, &job.run(&["train"]), &["channel train", "no .bin token shards", "it is empty"]);
    assert!(reason.contains(&train.display().to_string()), "{reason}");
    fs::remove_dir(&train).unwrap();
    fs::remove_file(job.base().join("output/failure")).unwrap();
    assert_failed(&job, &job.run(&["train"]), &["channel train", "does not exist"]);

    // A failure file left by an earlier run does not hide this run's success.
    let job = Job::new(&shards, r#"{"training.max_steps": "1"}"#);
    fs::create_dir_all(job.base().join("output")).unwrap();
    fs::write(job.base().join("output/failure"), "stale").unwrap();
    assert!(job.run(&["train"]).status.success());
    assert_eq!(job.failure(), None);
}

#[test]
fn a_panic_leaves_its_reason_in_the_failure_file() {
    let shards = Shards::new();
    let job = Job::new(&shards, "{}");
    let o = job.command(&["train"]).env("TRAINER_SAGEMAKER_TEST_PANIC", "1").output().unwrap();
    assert_eq!(o.status.code(), Some(101), "{}", stderr(&o));
    assert!(stderr(&o).contains("panicked"), "{}", stderr(&o));
    let failure = job.failure().expect("a failure file");
    assert!(failure.starts_with("panic at crates/cli/src/sagemaker.rs:"), "{failure}");
    assert!(failure.contains("induced by TRAINER_SAGEMAKER_TEST_PANIC"), "{failure}");
}

#[test]
fn a_bad_command_line_leaves_its_reason_in_the_failure_file() {
    let shards = Shards::new();
    let job = Job::new(&shards, "{}");
    let o = job.run(&["train", "--bogus"]);
    assert_eq!(o.status.code(), Some(2), "clap's usage error");
    let failure = job.failure().expect("a failure file");
    assert!(failure.contains("--bogus") && !failure.contains('\n'), "{failure:?}");
}

/// (name, regex) of every metric definition in docker/README.md's Estimator example.
fn readme_metric_definitions() -> Vec<(String, Regex)> {
    let readme = fs::read_to_string(repo_root().join("docker/README.md")).unwrap();
    let def = Regex::new(r#"\{"Name": "([^"]+)", "Regex": r"([^"]+)"\}"#).unwrap();
    def.captures_iter(&readme)
        .map(|c| {
            let (name, re) = (c[1].to_string(), c[2].to_string());
            assert!(!re.starts_with('^'), "{name}: {re} is anchored; mpirun prefixes lines with the rank");
            assert!(re.contains(&format!("{name}=")), "{name}: the regex {re} reads another key");
            let compiled = Regex::new(&re).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, compiled)
        })
        .collect()
}

#[test]
fn metric_lines_match_the_readme_regexes() {
    let defs = readme_metric_definitions();
    let names: Vec<&str> = defs.iter().map(|(n, _)| n.as_str()).collect();
    for must in ["train_loss", "val_loss", "lr", "grad_norm", "tok_per_s", "mfu"] {
        assert!(names.contains(&must), "README defines {must}: {names:?}");
    }

    let shards = Shards::new();
    let job = Job::new(&shards, r#"{"training.max_steps": "5"}"#);
    let o = job.run(&["train"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let mut lines: Vec<String> = out.lines().map(String::from).collect();
    // What a GPU run adds (MFU needs a GPU's peak FLOPs), formatted as trainer.rs logs it.
    lines.push("step=10 train_loss=3.2134 lr=6.000e-4 grad_norm=0.8312 tok_per_s=512345 mfu=0.472".into());

    // The log has lines other than step records that carry the same keys: the
    // start-up line's learning rate and the summary's final loss.
    assert!(lines.iter().any(|l| l.starts_with("parallel ") && l.contains(" lr=")), "{out}");
    assert!(lines.iter().any(|l| l.starts_with("done ") && l.contains(" train_loss=")), "{out}");
    for (name, re) in &defs {
        let mut matched = 0;
        for line in &lines {
            // The value SageMaker should record: the `name=` field's of a step
            // record (a line with `step=N`), when it is a number; nothing elsewhere.
            let step_record =
                line.split_whitespace().any(|kv| kv.strip_prefix("step=").is_some_and(|n| n.parse::<u64>().is_ok()));
            let want = line
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .filter(|v| step_record && v.parse::<f64>().is_ok_and(f64::is_finite));
            for prefix in ["", "[1,0]<stdout>:"] {
                let text = format!("{prefix}{line}");
                let got = re.captures(&text).map(|c| c[1].to_string());
                assert_eq!(got.as_deref(), want, "{name}: {re} on {text:?}");
            }
            matched += usize::from(want.is_some());
        }
        assert!(matched > 0, "{name}: no line of the trainer's output has it:\n{out}");
    }
}

#[test]
fn a_worker_serves_sshd_and_waits_for_the_leaders_word() {
    let shards = Shards::new();
    let job = Job::new(&shards, "{}");
    job.set_hosts("algo-2", &["algo-1", "algo-2"]);
    // The leader's word is already there: the worker exits at once with it.
    fs::write(job.path("done"), "0\n").unwrap();
    let o = job.command(&["train"]).env("TRAINER_SAGEMAKER_SSHD", "true").output().unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    assert!(out.contains("role=Worker") && out.contains("ended the job with status 0"), "{out}");
    assert!(train_lines(&out).is_empty(), "a worker does not train by itself");
    assert_eq!(job.outputs(), Vec::<String>::new());

    let o = job.command(&["train"]).env("TRAINER_SAGEMAKER_SSHD", "false").output().unwrap();
    assert_failed(&job, &o, &["sshd (false) failed to start"]);
}

/// A stand-in for mpirun: logs the leader's command line, then runs it with
/// real mpirun, allowing more ranks than cores (CI has two) and within a
/// time limit (a hang is a failure, never a wait).
const FAKE_MPIRUN: &str = r#"#!/bin/sh
echo "$@" >> "$(dirname "$0")/mpirun.log"
export OMPI_MCA_btl_vader_single_copy_mechanism=none
exec mpirun --oversubscribe --timeout 300 "$@"
"#;

/// The tests that start ranks under mpirun run one at a time: a stop
/// request reaches every rank process of the host (as in a container, where
/// there is one job), so another test's ranks would be stopped too.
static MPIRUN_JOBS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn executable(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

#[test]
fn several_processes_on_a_host_train_data_parallel_and_rank0_publishes() {
    if !mpi_available() {
        return;
    }
    let _one_at_a_time = MPIRUN_JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let shards = Shards::new();
    let job = Job::new(&shards, r#"{"training.max_steps": "3", "processes_per_host": "2"}"#);
    let mpirun = job.path("fake-mpirun");
    executable(&mpirun, FAKE_MPIRUN);
    let o = job.command(&["train"]).env("TRAINER_SAGEMAKER_MPIRUN", &mpirun).output().unwrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    assert!(out.contains("role=Leader") && out.contains("world_size=2"), "{out}");
    let launched = fs::read_to_string(job.path("mpirun.log")).unwrap();
    assert!(launched.contains("-np 2 --host localhost:2"), "{launched}");
    // Both ranks trained as one data-parallel job: rank 0 alone logs, and
    // alone writes the model, the metrics and the plots.
    assert!(out.contains("dp=2"), "{out}");
    assert_eq!(train_lines(&out).len(), 3, "{out}");
    assert_eq!(
        job.outputs(),
        [
            "checkpoints/step_00000003/manifest.json",
            "checkpoints/step_00000003/model.safetensors",
            "checkpoints/step_00000003/optim_rank00000.safetensors",
            "model/config.json",
            "model/model.safetensors",
            "model/trainer.toml",
            "output/data/metrics.jsonl",
            "output/data/report.png"
        ]
    );
    assert_hf_model(&job.base().join("model"));
    assert_eq!(job.failure(), None);

    // A rank that fails ends the job with its reason in the failure file
    // (the layout is checked against the world size where the ranks start).
    fs::remove_dir_all(job.base().join("checkpoints")).unwrap();
    fs::write(
        job.base().join("input/config/hyperparameters.json"),
        r#"{"processes_per_host": "2", "parallel.dp": "3"}"#,
    )
    .unwrap();
    let o = job.command(&["train"]).env("TRAINER_SAGEMAKER_MPIRUN", &mpirun).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let failure = job.failure().expect("a failure file");
    assert!(failure.contains("parallel.dp") && failure.contains('3'), "{failure}");
    assert!(failure.starts_with("rank "), "the failing rank is named: {failure}");
}

#[test]
fn the_leader_of_two_hosts_tells_the_worker_however_the_job_ends() {
    let shards = Shards::new();
    let job = Job::new(&shards, r#"{"training.max_steps": "3"}"#);
    job.set_hosts("algo-1", &["algo-1", "algo-2"]);
    // ssh stand-in: logs its arguments, runs the remote command here.
    let ssh = job.path("fake-ssh");
    executable(
        &ssh,
        "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/ssh.log\"\nfor last; do :; done\nexec sh -c \"$last\"\n",
    );
    let run = |job: &Job| {
        let mut c = job.command(&["train"]);
        c.env("TRAINER_SAGEMAKER_SSHD", "true")
            .env("TRAINER_SAGEMAKER_SSH", &ssh)
            .env("TRAINER_SAGEMAKER_PEER_WAIT_S", "0");
        c
    };
    // The worker never comes up (algo-2 does not resolve here): the leader
    // gives up within its wait, fails the job and still tells the worker.
    let o = run(&job).output().unwrap();
    assert!(stdout(&o).contains("role=Leader") && stdout(&o).contains("world_size=2"), "{}", stdout(&o));
    assert_failed(&job, &o, &["waiting for sshd on algo-2"]);
    assert_eq!(fs::read_to_string(job.path("done")).unwrap(), "1\n");
    let log = fs::read_to_string(job.path("ssh.log")).unwrap();
    assert!(log.contains("algo-2") && !log.contains("algo-1"), "{log}");

    // Likewise when its sshd does not start or the job's settings are bad.
    for (hyperparameters, sshd, reason) in [
        (r#"{"training.max_steps": "3"}"#, "false", "sshd (false) failed to start"),
        (r#"{"optimizer.lrx": "1"}"#, "true", "optimizer.lrx"),
    ] {
        fs::remove_file(job.base().join("output/failure")).ok();
        fs::write(job.path("done"), "").unwrap();
        fs::write(job.base().join("input/config/hyperparameters.json"), hyperparameters).unwrap();
        assert_failed(&job, &run(&job).env("TRAINER_SAGEMAKER_SSHD", sshd).output().unwrap(), &[reason]);
        assert_eq!(fs::read_to_string(job.path("done")).unwrap(), "1\n");
    }
}

/// SIGTERM to the container's process once training has started (as
/// SageMaker stops a job): a checkpoint, then exit 0, no failure file.
fn assert_sigterm_checkpoints_then_exits(job: &Job, mut command: Command) {
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the trainer ended before its first step").unwrap();
        if !train_lines(&line).is_empty() {
            break;
        }
    }
    let kill = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    for _ in lines {} // until the trainer closes stdout
    let status = child.wait().unwrap();
    assert!(status.success(), "a stopped job exits cleanly: {status}");
    let ckpt = job.base().join("checkpoints");
    assert!(fs::read_dir(&ckpt).is_ok_and(|mut d| d.next().is_some()), "a checkpoint in {}", ckpt.display());
    assert_eq!(job.failure(), None);
}

#[test]
fn sigterm_leads_to_a_checkpoint_then_exit() {
    let shards = Shards::new();
    let job = Job::new(&shards, r#"{"training.max_steps": "100000"}"#);
    assert_sigterm_checkpoints_then_exits(&job, job.command(&["train"]));
}

#[test]
fn sigterm_reaches_the_ranks_of_mpirun_which_checkpoint_then_exit() {
    if !mpi_available() {
        return;
    }
    let _one_at_a_time = MPIRUN_JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let shards = Shards::new();
    let job = Job::new(&shards, r#"{"training.max_steps": "100000", "processes_per_host": "2"}"#);
    let mpirun = job.path("fake-mpirun");
    executable(&mpirun, FAKE_MPIRUN);
    let mut command = job.command(&["train"]);
    command.env("TRAINER_SAGEMAKER_MPIRUN", &mpirun);
    assert_sigterm_checkpoints_then_exits(&job, command);
}

#[test]
fn resumes_from_a_prefilled_checkpoints_directory() {
    let shards = Shards::new();
    let first = Job::new(&shards, r#"{"training.max_steps": "4"}"#);
    let o = first.run(&["train"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let saved = first.base().join("checkpoints");
    assert!(fs::read_dir(&saved).is_ok_and(|mut d| d.next().is_some()), "a checkpoint at the end");

    // A new job whose checkpoint directory SageMaker filled from checkpoint_s3_uri.
    let second = Job::new(&shards, r#"{"training.max_steps": "8"}"#);
    let dest = second.base().join("checkpoints");
    fs::create_dir_all(&dest).unwrap();
    fn copy_dir(from: &Path, to: &Path) {
        for e in fs::read_dir(from).unwrap().flatten() {
            let (src, dst) = (e.path(), to.join(e.file_name()));
            if src.is_dir() {
                fs::create_dir_all(&dst).unwrap();
                copy_dir(&src, &dst);
            } else {
                fs::copy(&src, &dst).unwrap();
            }
        }
    }
    copy_dir(&saved, &dest);
    let o = second.run(&["train"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    let steps: Vec<&str> = train_lines(&out);
    assert_eq!(steps.len(), 4, "steps 5-8 only: {out}");
    assert!(steps[0].starts_with("step=5 "), "{}", steps[0]);
}

/// What can be checked of the image without building it: the points of the
/// contract that live in docker/Dockerfile and the files it shares with
/// docker/build-image.sh (hadolint, run by scripts/test.sh, checks the rest of
/// the Dockerfile's form; scripts/test-image.sh builds the image and runs it).
#[test]
fn the_dockerfile_keeps_the_contract() {
    let docker = repo_root().join("docker");
    let text = fs::read_to_string(docker.join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    let froms: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(
        froms,
        ["FROM debian:bookworm AS build", "FROM debian:bookworm-slim AS cuda", "FROM debian:bookworm-slim"],
        "the trainer and the CUDA libraries built apart, the runtime on the Debian docker/build-image.sh uses"
    );
    let runtime = &lines[lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap()..];
    let entry: Vec<&str> = runtime.iter().copied().filter(|l| l.starts_with("ENTRYPOINT")).collect();
    assert_eq!(entry, [r#"ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/trainer"]"#], "exec form");
    assert!(!runtime.iter().any(|l| l.starts_with("CMD")), "no CMD: SageMaker passes `train`");
    // The files both builds share, used by each.
    let script = fs::read_to_string(docker.join("build-image.sh")).unwrap();
    for shared in ["packages.txt", "cuda-wheels.txt", "install-cuda.sh", "setup-image.sh"] {
        assert!(text.contains(&format!("docker/{shared}")), "the Dockerfile uses docker/{shared}");
        assert!(script.contains(&format!("docker/{shared}")), "build-image.sh uses docker/{shared}");
    }
    let packages = fs::read_to_string(docker.join("packages.txt")).unwrap();
    let packages: Vec<&str> = packages.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).collect();
    for needed in ["openmpi-bin", "openssh-client", "openssh-server", "tini", "ca-certificates"] {
        assert!(packages.contains(&needed), "docker/packages.txt installs {needed}: {packages:?}");
    }
    // The image's NVRTC and headers are the ones CI compiles every kernel with.
    let wheels = fs::read_to_string(docker.join("cuda-wheels.txt")).unwrap();
    let test_sh = fs::read_to_string(repo_root().join("scripts/test.sh")).unwrap();
    for pin in ["nvidia-cuda-nvrtc==13.0.", "nvidia-cuda-runtime==13.0.", "nvidia-cublas==13.", "nvidia-nccl-cu13=="] {
        let line = wheels.lines().find(|l| l.starts_with(pin)).unwrap_or_else(|| panic!("{pin}* in cuda-wheels.txt"));
        if pin.contains("cuda-") {
            assert!(test_sh.contains(line), "scripts/test.sh installs {line} too");
        }
    }
    assert!(
        lines.iter().filter(|l| l.starts_with("COPY") || l.starts_with("ADD")).all(|l| !l.contains("/opt/ml")),
        "nothing of ours under /opt/ml"
    );
    assert!(text.contains("COPY --from=build /usr/local/bin/trainer /usr/local/bin/trainer"));
    // The default config the image names exists and is the one the trainer falls back to.
    let default = "/opt/trainer/configs/sagemaker-gpt2-124m.toml";
    assert!(runtime.contains(&format!("ENV TRAINER_SAGEMAKER_CONFIG={default}").as_str()));
    assert_eq!(trainer_sagemaker::job::DEFAULT_CONFIG, default);
    assert!(repo_root().join("configs/sagemaker-gpt2-124m.toml").is_file());
}
