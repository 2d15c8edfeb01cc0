//! A SageMaker job's settings as a config file plus `section.key=value`
//! overrides for `trainer_train::Config::load`, and where its outputs go.
//!
//! Overrides apply in this order, later ones winning: the hyperparameters,
//! then the keys SageMaker's layout decides (`data.train` and `data.val` from
//! the channels, `logging.run_dir` = output/data, the checkpoint directory),
//! then `--set` arguments given on the command line (ContainerArguments).
//! A hyperparameter for a key that the layout decides is dropped with a note,
//! except `data.train`/`data.val` when there is no channel for them: data
//! inside the image is then allowed.

use std::path::{Path, PathBuf};

use crate::channels::{self, DataChannels, InputDataConfig};
use crate::hyperparams::{CONFIG_KEY, Hyperparameters};
use crate::outputs::Outputs;
use crate::paths::Paths;
use crate::resource::ResourceConfig;
use crate::{Error, Result};

/// Where the image keeps its default config; the Dockerfile sets it.
pub const DEFAULT_CONFIG_ENV: &str = "TRAINER_SAGEMAKER_CONFIG";
pub const DEFAULT_CONFIG: &str = "/opt/trainer/configs/sagemaker-gpt2-124m.toml";

#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    /// The config used when no `config` hyperparameter is given.
    pub default_config: PathBuf,
    /// Where a relative `config` hyperparameter is looked for, in order, before
    /// the channels directory (input/data, so `config/job.toml` names a file
    /// of a channel called `config`).
    pub config_dirs: Vec<PathBuf>,
    /// `--set` arguments from the command line, applied last.
    pub cli_overrides: Vec<String>,
}

impl JobOptions {
    /// The image's default config (`TRAINER_SAGEMAKER_CONFIG`, else
    /// [`DEFAULT_CONFIG`]); relative `config` values are looked up in the
    /// current directory and the default config's directory.
    pub fn from_env() -> Self {
        let default_config =
            std::env::var_os(DEFAULT_CONFIG_ENV).filter(|v| !v.is_empty()).map_or(DEFAULT_CONFIG.into(), PathBuf::from);
        let mut config_dirs = vec![PathBuf::from(".")];
        if let Some(dir) = default_config.parent() {
            config_dirs.push(dir.to_path_buf());
            if let Some(up) = dir.parent() {
                // "configs/x.toml" relative to the image's install directory.
                config_dirs.push(up.to_path_buf());
            }
        }
        JobOptions { default_config, config_dirs, cli_overrides: Vec::new() }
    }
}

#[derive(Debug, Clone)]
pub struct Job {
    pub paths: Paths,
    pub config_file: PathBuf,
    /// `section.key=value` strings for `Config::load`, in order.
    pub overrides: Vec<String>,
    pub outputs: Outputs,
    pub resources: ResourceConfig,
    /// The `processes_per_host` hyperparameter.
    pub processes_per_host: Option<usize>,
    pub data: DataChannels,
    /// Things worth a line in the log (ignored keys, defaults taken).
    pub notes: Vec<String>,
}

/// A TOML string literal (quoted and escaped) for an override value.
fn lit(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The overrides that point checkpoints at SageMaker's checkpoint directory
/// and resume from what is there (files present at start mean resume).
pub fn checkpoint_overrides(dir: &Path) -> Vec<String> {
    vec![format!("checkpoint.dir={}", lit(&dir.display().to_string())), "checkpoint.resume=\"auto\"".into()]
}

/// Keys whose value the SageMaker layout decides.
const RUN_DIR_KEY: &str = "logging.run_dir";
const CHECKPOINT_DIR_KEY: &str = "checkpoint.dir";

impl Job {
    /// Reads every settings file under `paths` and finds the channels.
    pub fn load(paths: &Paths, opts: &JobOptions) -> Result<Job> {
        let hp = Hyperparameters::load(&paths.hyperparameters_file())?;
        let mut notes = hp.notes.clone();
        let resources = match ResourceConfig::load(&paths.resource_config_file())? {
            Some(r) => r,
            None => {
                notes.push(format!("no {}: one host", paths.resource_config_file().display()));
                ResourceConfig::single_host()
            }
        };
        let idc = InputDataConfig::load(&paths.input_data_config_file())?;
        let data = channels::discover(paths, idc.as_ref())?;
        notes.extend(data.notes.iter().cloned());
        let outputs = Outputs::locate(paths)?;
        let config_file = resolve_config(paths, opts, hp.config.as_deref())?;

        let mut overrides = Vec::new();
        let mut user_train = false;
        for o in &hp.overrides {
            let decided_by = match o.key.as_str() {
                "data.train" => data.train.as_ref().map(|c| format!("the `{}` channel", c.channel)),
                "data.val" => data.val.as_ref().map(|c| format!("the `{}` channel", c.channel)),
                RUN_DIR_KEY => Some(format!("SageMaker's output directory {}", outputs.output_data_dir.display())),
                CHECKPOINT_DIR_KEY => {
                    Some(format!("SageMaker's checkpoint directory {}", outputs.checkpoint_dir.display()))
                }
                _ => None,
            };
            match decided_by {
                Some(by) => notes.push(format!("ignoring hyperparameter {}: {by} decides it", o.key)),
                None => {
                    user_train |= o.key == "data.train";
                    overrides.push(o.to_string());
                }
            }
        }
        match &data.train {
            Some(t) => overrides.push(format!("data.train={}", lit(&t.pattern))),
            None if user_train => notes.push("no `train` channel: data.train comes from the hyperparameters".into()),
            None => {
                return Err(Error::Channel {
                    channel: channels::TRAIN_CHANNEL.into(),
                    dir: paths.channel_dir(channels::TRAIN_CHANNEL).display().to_string(),
                    msg: "the job has no training data: give the shards (`trainer prepare` output, token or image) as the `train` input channel".into(),
                });
            }
        }
        if let Some(v) = &data.val {
            overrides.push(format!("data.val={}", lit(&v.pattern)));
        }
        overrides.push(format!("{RUN_DIR_KEY}={}", lit(&outputs.output_data_dir.display().to_string())));
        overrides.extend(checkpoint_overrides(&outputs.checkpoint_dir));
        overrides.extend(opts.cli_overrides.iter().cloned());
        Ok(Job {
            paths: paths.clone(),
            config_file,
            overrides,
            outputs,
            resources,
            processes_per_host: hp.processes_per_host,
            data,
            notes,
        })
    }
}

/// The config named by the `config` hyperparameter, else the image's default.
fn resolve_config(paths: &Paths, opts: &JobOptions, named: Option<&str>) -> Result<PathBuf> {
    let Some(name) = named else {
        if opts.default_config.is_file() {
            return Ok(opts.default_config.clone());
        }
        return Err(Error::Settings {
            file: paths.hyperparameters_file().display().to_string(),
            msg: format!(
                "no `{CONFIG_KEY}` hyperparameter and the image's default config {} is missing: \
                 set `{CONFIG_KEY}` to a TOML config in the image or in a channel",
                opts.default_config.display()
            ),
        });
    };
    let p = Path::new(name);
    let candidates: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        opts.config_dirs.iter().map(|d| d.join(p)).chain([paths.data_dir().join(p)]).collect()
    };
    candidates.iter().find(|c| c.is_file()).cloned().ok_or_else(|| Error::Hyperparameter {
        key: CONFIG_KEY.into(),
        value: name.into(),
        msg: format!(
            "no such file; looked for {}",
            candidates.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs;

    struct Tree {
        _dir: tempfile::TempDir,
        paths: Paths,
        opts: JobOptions,
    }

    fn tree(hyperparameters: &str) -> Tree {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path().join("ml"));
        fs::create_dir_all(paths.input_config_dir()).unwrap();
        fs::write(paths.hyperparameters_file(), hyperparameters).unwrap();
        fs::create_dir_all(paths.channel_dir("train")).unwrap();
        fs::write(paths.channel_dir("train").join("train_000000.bin"), b"x").unwrap();
        let image = dir.path().join("image/configs");
        fs::create_dir_all(&image).unwrap();
        fs::write(image.join("default.toml"), "").unwrap();
        fs::write(image.join("other.toml"), "").unwrap();
        let mut opts = JobOptions { default_config: image.join("default.toml"), ..Default::default() };
        opts.config_dirs = vec![image.clone(), image.parent().unwrap().to_path_buf()];
        Tree { _dir: dir, paths, opts }
    }

    #[test]
    fn overrides_in_order_with_layout_keys_last() {
        let t = tree(r#"{"optimizer.lr": "3e-4", "logging.run_dir": "elsewhere", "data.train": "x/*.bin"}"#);
        let mut opts = t.opts.clone();
        opts.cli_overrides = vec!["training.max_steps=5".into()];
        let job = Job::load(&t.paths, &opts).unwrap();
        assert_eq!(job.config_file, t.opts.default_config);
        let train = t.paths.channel_dir("train").display().to_string();
        let out = t.paths.output_data_dir().display().to_string();
        assert_eq!(
            job.overrides,
            [
                "optimizer.lr=0.0003".to_string(),
                format!("data.train=\"{train}/**/*.bin\""),
                format!("logging.run_dir=\"{out}\""),
                format!("checkpoint.dir=\"{}\"", t.paths.default_checkpoint_dir().display()),
                "checkpoint.resume=\"auto\"".into(),
                "training.max_steps=5".into(),
            ]
        );
        assert!(job.notes.iter().any(|n| n.contains("logging.run_dir")), "{:?}", job.notes);
        assert!(job.notes.iter().any(|n| n.contains("data.train") && n.contains("`train` channel")));
        assert!(job.resources.is_leader());
    }

    #[test]
    fn checkpoints_go_to_sagemakers_directory() {
        let t = tree("{}");
        let job = Job::load(&t.paths, &t.opts).unwrap();
        let ck = t.paths.default_checkpoint_dir().display().to_string();
        assert!(job.overrides.contains(&format!("checkpoint.dir=\"{ck}\"")), "{:?}", job.overrides);
        assert!(job.overrides.contains(&"checkpoint.resume=\"auto\"".to_string()));
    }

    #[test]
    fn config_hyperparameter_is_found_in_the_image_or_a_channel() {
        let t = tree(r#"{"config": "other.toml"}"#);
        assert!(Job::load(&t.paths, &t.opts).unwrap().config_file.ends_with("configs/other.toml"));
        let t = tree(r#"{"config": "configs/other.toml"}"#);
        assert!(Job::load(&t.paths, &t.opts).unwrap().config_file.ends_with("configs/other.toml"));
        let t = tree(r#"{"config": "\"cfg/job.toml\""}"#);
        fs::create_dir_all(t.paths.channel_dir("cfg")).unwrap();
        fs::write(t.paths.channel_dir("cfg").join("job.toml"), "").unwrap();
        assert_eq!(Job::load(&t.paths, &t.opts).unwrap().config_file, t.paths.channel_dir("cfg").join("job.toml"));
        let t = tree(r#"{"config": "missing.toml"}"#);
        let e = Job::load(&t.paths, &t.opts).unwrap_err().to_string();
        assert!(e.contains("hyperparameter config = \"missing.toml\"") && e.contains("looked for"), "{e}");
    }

    #[test]
    fn missing_default_config_or_train_channel() {
        let t = tree("{}");
        let mut opts = t.opts.clone();
        opts.default_config = "/nonexistent/default.toml".into();
        let e = Job::load(&t.paths, &opts).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/default.toml") && e.contains("`config`"), "{e}");

        fs::remove_dir_all(t.paths.channel_dir("train")).unwrap();
        let e = Job::load(&t.paths, &t.opts).unwrap_err().to_string();
        assert!(e.contains("channel train") && e.contains("no training data"), "{e}");

        // Data inside the image, named by a hyperparameter, is allowed without a channel.
        fs::write(t.paths.hyperparameters_file(), r#"{"data.train": "/data/*.bin"}"#).unwrap();
        let job = Job::load(&t.paths, &t.opts).unwrap();
        assert_eq!(job.overrides[0], "data.train=\"/data/*.bin\"");
    }
}
