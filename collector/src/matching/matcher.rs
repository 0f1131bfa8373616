//! How to recognise a hypervisor process, name its instance and tell its vCPU threads.
//!
//! A [`Matcher`] is three rules: the executable (a glob over the path, or over the base name when
//! the pattern has no `/`), the instance id (from the command line), and the vCPU thread names.
//! The built-ins cover Firecracker (and the Unikraft fork run by `ukpd`), QEMU and Cloud
//! Hypervisor; more come from the config file.

use std::path::Path;

use collector_common::COMM_LEN;
use regex::Regex;

use super::cmdline::{flag_value, qemu_guest_name};
use crate::config::MatcherConfig;

/// How the instance id is found in a command line.
#[derive(Debug, Clone)]
pub(crate) enum IdRule {
    /// `--uuid <id>` (Unikraft/ukp fork), else upstream Firecracker's `--id <id>`.
    Firecracker,
    /// `-uuid <id>`, else `-name guest=<name>,...` / `-name <name>`.
    Qemu,
    /// The folder holding `--api-socket` (`/run/vc/vm/<id>/clh-api.sock`, possibly `path=...`).
    CloudHypervisor,
    /// First capture group of a regex over the arguments joined by single spaces.
    Regex(Regex),
}

/// The hypervisors the built-in matchers know, whose configuration the collector can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "the product is called Cloud Hypervisor"
)]
pub(crate) enum Hypervisor {
    Firecracker,
    Qemu,
    CloudHypervisor,
}

#[derive(Debug, Clone)]
pub(crate) struct Matcher {
    /// Unique name, e.g. `firecracker`.
    pub(crate) name: String,
    /// Value of the `hypervisor` label.
    pub(crate) hypervisor: String,
    executable: glob::Pattern,
    /// Whether `executable` is matched against the whole path (it contains a `/`).
    executable_is_path: bool,
    id: IdRule,
    /// vCPU thread names; the first capture group, when present, is the vCPU index.
    vcpu_thread: Regex,
    /// Where the per-instance folder is, if the runtime keeps one (`{id}` is replaced).
    pub(crate) instance_dir: Option<String>,
    /// Folders its executables must be in (`trusted_executable_dirs`, and a custom matcher's
    /// own); set by [`super::Matchers::from_config`].
    pub(crate) trusted_executable_dirs: Vec<std::path::PathBuf>,
}

/// A `comm` prefix the kernel matches at exec (see `collector_common::CommKey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CommPrefix {
    pub(crate) bytes: [u8; COMM_LEN],
    /// Significant bytes (NUL included for an exact name).
    pub(crate) len: usize,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MatcherError {
    #[error("matcher {name}: bad executable pattern {pattern:?}")]
    Glob {
        name: String,
        pattern: String,
        #[source]
        source: glob::PatternError,
    },
    #[error("matcher {name}: bad {what} regex")]
    Regex {
        name: String,
        what: &'static str,
        #[source]
        source: regex::Error,
    },
    #[error(
        "matcher {name}: the executable's base name in {pattern:?} must start with a literal \
         prefix (the kernel matches it at exec, before anything else runs)"
    )]
    NoLiteralPrefix { name: String, pattern: String },
    #[error("matcher {name}: instance_id regex needs one capture group")]
    NoCaptureGroup { name: String },
}

impl Matcher {
    fn new(
        name: &str,
        hypervisor: &str,
        executable: &str,
        id: IdRule,
        vcpu_thread: &str,
        instance_dir: Option<&str>,
    ) -> Result<Self, MatcherError> {
        let matcher = Self {
            name: name.to_owned(),
            hypervisor: hypervisor.to_owned(),
            executable: glob::Pattern::new(executable).map_err(|source| MatcherError::Glob {
                name: name.to_owned(),
                pattern: executable.to_owned(),
                source,
            })?,
            executable_is_path: executable.contains('/'),
            id,
            vcpu_thread: Regex::new(vcpu_thread).map_err(|source| MatcherError::Regex {
                name: name.to_owned(),
                what: "vcpu_thread",
                source,
            })?,
            instance_dir: instance_dir.map(str::to_owned),
            trusted_executable_dirs: Vec::new(),
        };
        matcher.comm_prefix()?;
        Ok(matcher)
    }

    /// The built-in matchers, in the order they are tried.
    pub(crate) fn builtins() -> Vec<Self> {
        let builtin = |r: Result<Self, MatcherError>| r.expect("built-in matchers are valid");
        vec![
            builtin(Self::new(
                "firecracker",
                "firecracker",
                "firecracker",
                IdRule::Firecracker,
                r"^fc_vcpu ?(\d+)$",
                Some("/var/lib/ukp/data/platform/{id}"),
            )),
            builtin(Self::new(
                "qemu",
                "qemu",
                "qemu-system-*",
                IdRule::Qemu,
                r"^CPU (\d+)/(?:KVM|TCG|HVF|WHPX)$",
                None,
            )),
            builtin(Self::new(
                "cloud-hypervisor",
                "cloud-hypervisor",
                "cloud-hypervisor",
                IdRule::CloudHypervisor,
                r"^vcpu(\d+)$",
                None,
            )),
        ]
    }

    /// A matcher from the config file.
    pub(crate) fn from_config(config: &MatcherConfig) -> Result<Self, MatcherError> {
        let id = Regex::new(&config.instance_id).map_err(|source| MatcherError::Regex {
            name: config.name.clone(),
            what: "instance_id",
            source,
        })?;
        if id.captures_len() < 2 {
            return Err(MatcherError::NoCaptureGroup {
                name: config.name.clone(),
            });
        }
        Self::new(
            &config.name,
            config.hypervisor.as_deref().unwrap_or(&config.name),
            &config.executable,
            IdRule::Regex(id),
            &config.vcpu_thread,
            config.instance_dir.as_deref(),
        )
    }

    /// Does this matcher claim the executable at `path`?
    pub(crate) fn matches_executable(&self, path: &str) -> bool {
        if self.executable_is_path {
            self.executable.matches(path)
        } else {
            let base = Path::new(path)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(path);
            self.executable.matches(base)
        }
    }

    /// The instance id in `args` (argv[0] included), if the command line names one.
    pub(crate) fn instance_id(&self, args: &[String]) -> Option<String> {
        let id = match &self.id {
            IdRule::Firecracker => {
                flag_value(args, &["--uuid"]).or_else(|| flag_value(args, &["--id"]))
            }
            IdRule::Qemu => flag_value(args, &["-uuid", "--uuid"]).or_else(|| {
                let name = flag_value(args, &["-name", "--name"])?;
                qemu_guest_name(&name)
            }),
            IdRule::CloudHypervisor => {
                let socket = flag_value(args, &["--api-socket"])?;
                let path = socket
                    .split(',')
                    .find_map(|part| part.strip_prefix("path="))
                    .unwrap_or(if socket.contains('=') { "" } else { &socket });
                Path::new(path)
                    .parent()
                    .and_then(Path::file_name)
                    .and_then(|n| n.to_str())
                    .map(str::to_owned)
            }
            IdRule::Regex(re) => re
                .captures(&args.join(" "))
                .and_then(|c| c.get(1))
                .map(|m| m.as_str().to_owned()),
        }?;
        (!id.is_empty()).then_some(id)
    }

    /// The vCPU index of a thread called `thread_name`, if it is a vCPU thread.
    pub(crate) fn vcpu_index(&self, thread_name: &str) -> Option<u32> {
        let caps = self.vcpu_thread.captures(thread_name)?;
        Some(
            caps.get(1)
                .and_then(|m| m.as_str().parse().ok())
                .unwrap_or(0),
        )
    }

    /// Which known hypervisor this matcher's processes are (built-in matchers only).
    pub(crate) fn builtin_hypervisor(&self) -> Option<Hypervisor> {
        match self.id {
            IdRule::Firecracker => Some(Hypervisor::Firecracker),
            IdRule::Qemu => Some(Hypervisor::Qemu),
            IdRule::CloudHypervisor => Some(Hypervisor::CloudHypervisor),
            IdRule::Regex(_) => None,
        }
    }

    /// Whether a thread called `thread_name` is a vCPU thread.
    pub(crate) fn is_vcpu_thread(&self, thread_name: &str) -> bool {
        self.vcpu_thread.is_match(thread_name)
    }

    /// The thread-name prefixes the kernel uses to tell vCPU threads when they are named: every
    /// name the vCPU pattern matches starts with one of them (cut to the kernel's 15 bytes).
    /// Empty when the pattern is not anchored at the start or starts with no literal: then the
    /// kernel counts every thread as `vmm`, and only threads running when the instance is found
    /// are classified, by userspace.
    pub(crate) fn vcpu_comm_prefixes(&self) -> Vec<Vec<u8>> {
        use regex_syntax::hir::{
            Look,
            literal::{ExtractKind, Extractor},
        };
        let Ok(hir) = regex_syntax::parse(self.vcpu_thread.as_str()) else {
            return Vec::new();
        };
        if !hir.properties().look_set_prefix().contains(Look::Start) {
            return Vec::new();
        }
        // A class of more than one byte ends the literal: `fc_vcpu ?(\d+)` gives `fc_vcpu `
        // and `fc_vcpu`, not one literal per digit.
        let seq = Extractor::new()
            .kind(ExtractKind::Prefix)
            .limit_class(1)
            .extract(&hir);
        let Some(literals) = seq.literals() else {
            return Vec::new();
        };
        let mut prefixes: Vec<Vec<u8>> = literals
            .iter()
            .map(|l| l.as_bytes()[..l.as_bytes().len().min(COMM_LEN - 1)].to_vec())
            .collect();
        if prefixes.iter().any(Vec::is_empty) {
            return Vec::new();
        }
        prefixes.sort();
        prefixes.dedup();
        prefixes
    }

    /// The per-instance folder for `id`, when the runtime keeps one; never for an id that
    /// could steer the path (`/`, `..`, NUL).
    pub(crate) fn instance_dir_for(&self, id: &str) -> Option<String> {
        if !super::is_path_safe(id) {
            return None;
        }
        self.instance_dir.as_ref().map(|d| d.replace("{id}", id))
    }

    /// The `comm` prefix the kernel matches at exec: the base-name pattern's literal prefix, cut
    /// to what fits in `comm` (15 bytes), NUL included when the pattern is a plain name.
    pub(crate) fn comm_prefix(&self) -> Result<CommPrefix, MatcherError> {
        let pattern = self.executable.as_str();
        let base = pattern.rsplit('/').next().unwrap_or(pattern);
        let literal_end = base.find(['*', '?', '[']).unwrap_or(base.len());
        let literal = &base.as_bytes()[..literal_end];
        if literal.is_empty() {
            return Err(MatcherError::NoLiteralPrefix {
                name: self.name.clone(),
                pattern: pattern.to_owned(),
            });
        }
        let mut bytes = [0u8; COMM_LEN];
        let cut = literal.len().min(COMM_LEN - 1);
        bytes[..cut].copy_from_slice(&literal[..cut]);
        let exact = literal_end == base.len();
        // A plain name fits in comm whole (plus its NUL) or is cut by the kernel at 15 bytes:
        // either way the NUL at `cut` is part of what the kernel sees.
        let len = if exact { cut + 1 } else { cut };
        Ok(CommPrefix { bytes, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn builtin(name: &str) -> Matcher {
        Matcher::builtins()
            .into_iter()
            .find(|m| m.name == name)
            .unwrap()
    }

    #[test]
    fn firecracker_ukp_command_line() {
        let fc = builtin("firecracker");
        let line = "/usr/bin/firecracker --db-path /var/lib/ukp/data/platform --ukp-sock ukp.sock \
                    --no-api --uuid 7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11 --ukp-snapshot-mode \
                    external --config-file vmm.json --boot-timer";
        assert!(fc.matches_executable("/usr/bin/firecracker"));
        assert_eq!(
            fc.instance_id(&args(line)).as_deref(),
            Some("7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11")
        );
        assert_eq!(
            fc.instance_dir_for("abc").as_deref(),
            Some("/var/lib/ukp/data/platform/abc")
        );
    }

    #[test]
    fn firecracker_upstream_id_and_equals_form() {
        let fc = builtin("firecracker");
        let line = "firecracker --api-sock /run/fc.sock --id=vm-42";
        assert_eq!(fc.instance_id(&args(line)).as_deref(), Some("vm-42"));
        assert_eq!(fc.instance_id(&args("firecracker --no-api")), None);
        assert_eq!(fc.instance_id(&args("firecracker --uuid")), None);
    }

    #[test]
    fn qemu_uuid_then_guest_name() {
        let q = builtin("qemu");
        assert!(q.matches_executable("/usr/bin/qemu-system-x86_64"));
        assert!(q.matches_executable("qemu-system-aarch64"));
        assert!(!q.matches_executable("/usr/bin/qemu-img"));
        let libvirt = "/usr/bin/qemu-system-x86_64 -name guest=web-1,debug-threads=on -S \
                       -machine pc-q35-7.2,usb=off -uuid 0f8fad5b-d9cb-469f-a165-70867728950e -smp 2";
        assert_eq!(
            q.instance_id(&args(libvirt)).as_deref(),
            Some("0f8fad5b-d9cb-469f-a165-70867728950e")
        );
        let named = "qemu-system-x86_64 -name guest=web-1,debug-threads=on -m 512";
        assert_eq!(q.instance_id(&args(named)).as_deref(), Some("web-1"));
        assert_eq!(
            q.instance_id(&args("qemu-system-x86_64 -name plain"))
                .as_deref(),
            Some("plain")
        );
        assert_eq!(
            q.instance_id(&args("qemu-system-x86_64 -name debug-threads=on")),
            None
        );
    }

    #[test]
    fn cloud_hypervisor_kata_api_socket() {
        let ch = builtin("cloud-hypervisor");
        let kata = "/usr/local/bin/cloud-hypervisor --api-socket /run/vc/vm/3c1f6a/clh-api.sock \
                    --event-monitor fd=3";
        assert_eq!(ch.instance_id(&args(kata)).as_deref(), Some("3c1f6a"));
        let path_form = "cloud-hypervisor --api-socket path=/run/vc/vm/abc-def/clh-api.sock";
        assert_eq!(ch.instance_id(&args(path_form)).as_deref(), Some("abc-def"));
        assert_eq!(
            ch.instance_id(&args("cloud-hypervisor --api-socket fd=4")),
            None
        );
    }

    #[test]
    fn vcpu_thread_names() {
        assert_eq!(builtin("firecracker").vcpu_index("fc_vcpu 3"), Some(3));
        assert_eq!(builtin("firecracker").vcpu_index("fc_api"), None);
        assert_eq!(builtin("qemu").vcpu_index("CPU 1/KVM"), Some(1));
        assert_eq!(builtin("qemu").vcpu_index("CPU 0/TCG"), Some(0));
        assert_eq!(builtin("qemu").vcpu_index("worker"), None);
        assert_eq!(builtin("cloud-hypervisor").vcpu_index("vcpu12"), Some(12));
        assert_eq!(builtin("cloud-hypervisor").vcpu_index("vmm"), None);
    }

    #[test]
    fn vcpu_comm_prefixes_for_the_kernel() {
        let prefixes = |m: &Matcher| -> Vec<String> {
            m.vcpu_comm_prefixes()
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect()
        };
        assert_eq!(prefixes(&builtin("firecracker")), ["fc_vcpu", "fc_vcpu "]);
        assert_eq!(prefixes(&builtin("qemu")), ["CPU "]);
        assert_eq!(prefixes(&builtin("cloud-hypervisor")), ["vcpu"]);
        let custom = |vcpu: &str| {
            Matcher::from_config(&MatcherConfig {
                name: "x".into(),
                hypervisor: None,
                executable: "x".into(),
                instance_id: "(.*)".into(),
                vcpu_thread: vcpu.into(),
                instance_dir: None,
                trusted_executable_dirs: Vec::new(),
            })
            .unwrap()
        };
        assert_eq!(
            prefixes(&custom("^(?:vcpu|cpu)-(\\d+)$")),
            ["cpu-", "vcpu-"]
        );
        assert_eq!(
            prefixes(&custom("^a_very_long_vcpu_thread_name(\\d+)$")),
            ["a_very_long_vcp"]
        );
        // Unanchored, or no literal start: the kernel cannot tell; userspace does at discovery.
        assert!(prefixes(&custom("vcpu(\\d+)")).is_empty());
        assert!(prefixes(&custom("^\\w+_vcpu")).is_empty());
        assert!(custom("^(?:vcpu|cpu)-(\\d+)$").is_vcpu_thread("cpu-3"));
    }

    #[test]
    fn comm_prefixes_follow_the_kernel_cut() {
        let p = builtin("firecracker").comm_prefix().unwrap();
        assert_eq!(&p.bytes[..p.len], b"firecracker\0");
        let p = builtin("qemu").comm_prefix().unwrap();
        assert_eq!(&p.bytes[..p.len], b"qemu-system-");
        // "cloud-hypervisor" is 16 bytes: the kernel keeps 15 and the NUL.
        let p = builtin("cloud-hypervisor").comm_prefix().unwrap();
        assert_eq!(&p.bytes[..p.len], b"cloud-hyperviso\0");
    }

    #[test]
    fn custom_matcher_needs_literal_prefix_and_group() {
        let mut cfg = MatcherConfig {
            name: "crosvm".into(),
            hypervisor: None,
            executable: "*vm".into(),
            instance_id: r"--name (\S+)".into(),
            vcpu_thread: r"^crosvm_vcpu(\d+)$".into(),
            instance_dir: None,
            trusted_executable_dirs: Vec::new(),
        };
        assert!(matches!(
            Matcher::from_config(&cfg),
            Err(MatcherError::NoLiteralPrefix { .. })
        ));
        cfg.executable = "/opt/bin/crosvm*".into();
        let m = Matcher::from_config(&cfg).unwrap();
        assert!(m.matches_executable("/opt/bin/crosvm-1.2"));
        assert!(!m.matches_executable("/usr/bin/crosvm"));
        assert_eq!(
            m.instance_id(&args("crosvm run --name vm7 k")).as_deref(),
            Some("vm7")
        );
        cfg.instance_id = "--name".into();
        assert!(matches!(
            Matcher::from_config(&cfg),
            Err(MatcherError::NoCaptureGroup { .. })
        ));
    }
}
