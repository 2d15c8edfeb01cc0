//! `trainer train` inside a SageMaker training job: glue between the job's
//! settings and multi-host protocol (crate trainer-sagemaker) and the
//! training loop. Every container of the job runs this; what it does depends
//! on its role: the leader (hosts[0]) trains or starts `mpirun`, a worker
//! serves sshd and waits for the job's end, a rank started by `mpirun` trains.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trainer_sagemaker::cluster::{
    self, ClusterSettings, SSH_PORT, SystemClock, WorkerWait, forward_stop, run_until_exit, signal_job_end, start_sshd,
    stop_flag, tcp_probe, wait_for_job_end, wait_for_peers,
};
use trainer_sagemaker::launch::{MpirunSpec, efa_present, forwarded_env, gpu_count, is_rank_process, mpirun_command};
use trainer_sagemaker::{Job, JobOptions, LaunchPlan, Mode, Outputs, Paths, ResourceConfig, Role, write_failure};

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Set in tests: panics once the job's settings are read, to check that a
/// panic leaves its reason in the failure file.
const TEST_PANIC_ENV: &str = "TRAINER_SAGEMAKER_TEST_PANIC";

/// Writes the reason of a panic to the failure file, then reports the panic as usual.
pub fn install_failure_hook(paths: &Paths) {
    let file = paths.failure_file();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let _ = write_failure(&file, &format!("panic{at}: {msg}"));
        previous(info);
    }));
}

/// Leaves the error's one-line reason in the failure file.
pub fn record_failure(paths: &Paths, err: &anyhow::Error) {
    let file = paths.failure_file();
    if let Err(e) = write_failure(&file, &format!("{err:#}")) {
        eprintln!("warning: cannot write the failure reason to {}: {e}", file.display());
    }
}

/// The job as this container's role requires. `cli_overrides` are `--set`
/// arguments given on the command line (ContainerArguments); they win over
/// the hyperparameters.
pub fn run(paths: &Paths, cli_overrides: &[String]) -> Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    if !is_rank_process(&env) {
        // This process starts the job on its host: a failure file there is from an earlier run.
        Outputs::locate(paths)?.clear_stale_failure()?;
    }
    let settings = ClusterSettings::from_env()?;
    let mut opts = JobOptions::from_env();
    opts.cli_overrides = cli_overrides.to_vec();
    let job = match Job::load(paths, &opts) {
        Ok(job) => job,
        Err(e) => {
            // The workers wait for the leader's word: a leader that cannot even read the job says so.
            if !is_rank_process(&env)
                && let Ok(Some(rc)) = ResourceConfig::load(&paths.resource_config_file())
                && rc.is_leader()
                && !rc.workers().is_empty()
            {
                tell_workers(rc.workers(), &settings, 1);
            }
            return Err(e.into());
        }
    };
    if std::env::var_os(TEST_PANIC_ENV).is_some() {
        panic!("induced by {TEST_PANIC_ENV} (a test of the failure file)");
    }
    let plan = LaunchPlan::new(&job.resources, job.processes_per_host, gpu_count(&settings.dev_dir));
    let role = plan.role(is_rank_process(&env));
    if role != Role::Rank {
        for note in &job.notes {
            println!("sagemaker: {note}");
        }
        println!(
            "sagemaker: host={} role={role:?} hosts={} processes_per_host={} world_size={} config={} checkpoints={}",
            plan.current_host,
            plan.hosts.join(","),
            plan.processes_per_host,
            plan.world_size(),
            job.config_file.display(),
            job.outputs.checkpoint_dir.display()
        );
    }
    match role {
        Role::Rank => train_here(&job),
        Role::Leader => lead(&job, &plan, &settings, &env, cli_overrides),
        Role::Worker => work(&plan, &settings),
    }
}

/// Trains in this process: the whole job, or one rank of it under `mpirun`
/// (the training loop finds its rank in the launcher's environment).
fn train_here(job: &Job) -> Result<()> {
    let cfg = crate::load_config_file(&job.config_file, &job.overrides)?;
    job.outputs.create_dirs()?;
    let summary = crate::train_and_report(&cfg)?;
    // Only rank 0 of a finished run has final weights. Stopped by a signal:
    // the checkpoint is the job's result; SageMaker starts the job again from
    // it (managed spot) or it was stopped on purpose.
    let Some(weights) = summary.weights.as_deref() else { return Ok(()) };
    publish_model(job, &cfg, weights)?;
    // The curves beside metrics.jsonl; a plot that cannot be drawn does not fail a trained job.
    match trainer_report::report(&job.outputs.output_data_dir, None) {
        Ok(r) => println!("sagemaker: plots in {}", r.output.display()),
        Err(e) => eprintln!("warning: no plots in {}: {e}", job.outputs.output_data_dir.display()),
    }
    Ok(())
}

/// The final model in the model directory as transformers'
/// `from_pretrained` reads it (config.json + model.safetensors), with the
/// training config beside it. Our own weights file in the run directory
/// (output/data) is removed once exported: the same model twice in the job's
/// outputs would only double the upload.
fn publish_model(job: &Job, cfg: &trainer_train::Config, weights: &std::path::Path) -> Result<()> {
    let model_dir = &job.outputs.model_dir;
    // An image classifier's class names, from the classes.txt `trainer prepare` wrote beside its shards.
    let class_names = trainer_data::find_files(&cfg.data.train)
        .ok()
        .and_then(|files| files.first().and_then(|f| f.parent()).map(|d| d.join(trainer_data::CLASS_NAMES_FILE)))
        .filter(|f| f.is_file())
        .map(|f| trainer_data::read_class_names(&f))
        .transpose()?;
    let is_image_model = cfg.model_desc().is_ok_and(|d| d.kind == "vit");
    let names = class_names.as_deref().filter(|_| is_image_model);
    let fields = crate::interop::export_hf(weights, names, model_dir)
        .with_context(|| format!("exporting the final model to {}", model_dir.display()))?;
    let toml = toml::to_string(cfg).context("writing the training config beside the model")?;
    job.outputs.add_to_model(&[("trainer.toml", toml.as_bytes())])?;
    std::fs::remove_file(weights).with_context(|| format!("removing {} once exported", weights.display()))?;
    println!("sagemaker: final model (Hugging Face format, {fields}) in {}", model_dir.display());
    Ok(())
}

/// The leader: trains in this process, or runs `mpirun` over every host; with
/// several hosts, then tells the workers the job ended, however it ended.
fn lead(
    job: &Job,
    plan: &LaunchPlan,
    settings: &ClusterSettings,
    env: &[(String, String)],
    cli: &[String],
) -> Result<()> {
    if !plan.multi_host() && plan.mode == Mode::InProcess {
        return train_here(job);
    }
    let result = catch_unwind(AssertUnwindSafe(|| {
        if plan.multi_host() {
            // The workers watch this sshd to notice a leader that vanished.
            start_sshd(&settings.sshd)?;
        }
        match plan.mode {
            Mode::InProcess => train_here(job),
            Mode::Mpirun => launch(job, plan, settings, env, cli),
        }
    }));
    if plan.multi_host() {
        tell_workers(plan.workers(), settings, i32::from(!matches!(result, Ok(Ok(())))));
    }
    match result {
        Ok(r) => r,
        Err(panic) => resume_unwind(panic),
    }
}

/// Writes the job's end (`status`) into each worker's done-file over ssh,
/// first giving workers that are not up yet a bounded time to start sshd.
fn tell_workers(workers: &[String], settings: &ClusterSettings, status: i32) {
    let mut clock = SystemClock::default();
    let wait = settings.peer_wait.min(Duration::from_secs(120));
    let up = wait_for_peers(workers, wait, Duration::from_secs(2), &mut clock, &mut |h| {
        tcp_probe(h, SSH_PORT, PROBE_TIMEOUT)
    });
    if let Err(e) = up {
        eprintln!("warning: {e}");
    }
    let failed =
        signal_job_end(workers, &settings.ssh, &settings.done_file, status, &mut clock, &mut cluster::run_quiet);
    for w in &failed {
        eprintln!("warning: {w}");
    }
    println!(
        "sagemaker: told {} of {} worker(s) that the job ended with status {status}",
        workers.len() - failed.len(),
        workers.len()
    );
}

/// Runs the ranks of every host under `mpirun` and waits for them.
fn launch(
    job: &Job,
    plan: &LaunchPlan,
    settings: &ClusterSettings,
    env: &[(String, String)],
    cli: &[String],
) -> Result<()> {
    // A bad config or hyperparameter fails here, once, before any host is contacted.
    crate::load_config_file(&job.config_file, &job.overrides)?;
    job.outputs.create_dirs()?;
    let stop = stop_flag()?;
    if plan.multi_host() {
        println!("sagemaker: waiting for sshd on {}", plan.workers().join(", "));
        wait_for_peers(
            plan.workers(),
            settings.peer_wait,
            Duration::from_secs(2),
            &mut SystemClock::default(),
            &mut |h| tcp_probe(h, SSH_PORT, PROBE_TIMEOUT),
        )?;
    }
    let exe = std::env::current_exe().context("locating the trainer binary")?;
    let mut program = vec![exe.display().to_string(), "train".to_string()];
    for o in cli {
        program.extend(["--set".to_string(), o.clone()]);
    }
    let efa = plan.multi_host() && efa_present(&settings.dev_dir);
    let interface = job.resources.network_interface_name.as_deref();
    let vars = forwarded_env(env, interface, efa);
    let argv = mpirun_command(&MpirunSpec {
        mpirun: &settings.mpirun,
        hosts: &plan.hosts,
        slots_per_host: plan.processes_per_host,
        network_interface: interface,
        env: &vars,
        program: &program,
    });
    println!("sagemaker: {}", argv.join(" "));
    let status = run_until_exit(&argv, &stop, &mut || forward_stop(&settings.proc_dir))?;
    if !status.success() {
        bail!("mpirun exited with {status}: a rank failed (its error is above in the log)");
    }
    Ok(())
}

/// A worker: serves sshd for the leader's `mpirun` and waits for the leader to
/// say the job ended. Exits 0 whatever the job's status: the leader reports
/// the job's failure, and a second report would only hide the first.
fn work(plan: &LaunchPlan, settings: &ClusterSettings) -> Result<()> {
    let stop = stop_flag()?;
    start_sshd(&settings.sshd)?;
    println!("sagemaker: sshd started; waiting for the leader {} to end the job", plan.leader());
    let status = wait_for_job_end(
        &settings.done_file,
        plan.leader(),
        &WorkerWait::default(),
        &mut SystemClock::default(),
        &mut || tcp_probe(plan.leader(), SSH_PORT, PROBE_TIMEOUT).is_ok(),
        &|| stop.load(Ordering::SeqCst),
        &mut || forward_stop(&settings.proc_dir),
    )?;
    println!("sagemaker: the leader ended the job with status {status}");
    Ok(())
}
