//! What an instance was given, vCPUs and memory, read once from its VMM's configuration when the
//! instance is found: Firecracker's JSON config file (`--config-file`, else `vmm.json` in the
//! per-instance folder), QEMU's `-smp`/`-m`, Cloud Hypervisor's `--cpus`/`--memory`. A VMM
//! configured another way (an API socket) has no allocation: its series are absent.

use std::path::{Path, PathBuf};

use super::{cmdline::flag_value, matcher::Hypervisor};
pub(crate) use crate::model::instance::Allocation;

const MIB: u64 = 1 << 20;

/// Where an instance's allocation is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AllocationSource {
    /// On the command line (QEMU, Cloud Hypervisor): already parsed.
    CommandLine(Allocation),
    /// In a Firecracker JSON config file, to be read from the host.
    FirecrackerFile(ConfigFile),
    /// Nowhere the collector knows (custom matchers, an API-configured VMM).
    Unknown,
}

/// A VMM's config file, as its command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ConfigFile {
    /// An absolute path.
    Absolute(PathBuf),
    /// A path relative to the VMM's working directory.
    RelativeToCwd(PathBuf),
    /// `vmm.json` in the per-instance folder.
    InInstanceDir(PathBuf),
}

/// Where the allocation of a VMM of kind `hypervisor` started with `args` (argv[0] first) is.
pub(crate) fn source(
    hypervisor: Option<Hypervisor>,
    args: &[String],
    instance_dir: Option<&str>,
) -> AllocationSource {
    match hypervisor {
        Some(Hypervisor::Firecracker) => firecracker_config_file(args, instance_dir)
            .map_or(AllocationSource::Unknown, AllocationSource::FirecrackerFile),
        Some(Hypervisor::Qemu) => AllocationSource::CommandLine(Allocation {
            vcpus: flag_value(args, &["-smp", "--smp"]).and_then(|v| qemu_smp(&v)),
            memory_bytes: flag_value(args, &["-m", "--m"]).and_then(|v| qemu_memory(&v)),
        }),
        Some(Hypervisor::CloudHypervisor) => AllocationSource::CommandLine(Allocation {
            vcpus: flag_value(args, &["--cpus"]).and_then(|v| cloud_hypervisor_cpus(&v)),
            memory_bytes: flag_value(args, &["--memory"]).and_then(|v| cloud_hypervisor_memory(&v)),
        }),
        None => AllocationSource::Unknown,
    }
}

/// `--config-file` (relative to the VMM's working directory), else `vmm.json` in the instance
/// folder.
fn firecracker_config_file(args: &[String], instance_dir: Option<&str>) -> Option<ConfigFile> {
    if let Some(file) = flag_value(args, &["--config-file"]) {
        let file = PathBuf::from(file);
        return Some(if file.is_absolute() {
            ConfigFile::Absolute(file)
        } else {
            ConfigFile::RelativeToCwd(file)
        });
    }
    Some(ConfigFile::InInstanceDir(
        Path::new(instance_dir?).join("vmm.json"),
    ))
}

/// Firecracker's config file: `machine-config.vcpu_count` and `machine-config.mem_size_mib`.
pub(crate) fn firecracker(json: &str) -> Allocation {
    let Ok(config) = serde_json::from_str::<serde_json::Value>(json) else {
        return Allocation::default();
    };
    let machine = &config["machine-config"];
    Allocation {
        vcpus: machine["vcpu_count"]
            .as_u64()
            .and_then(|v| u32::try_from(v).ok()),
        memory_bytes: machine["mem_size_mib"]
            .as_u64()
            .and_then(|m| m.checked_mul(MIB)),
    }
}

/// QEMU `-smp`: `4`, `4,sockets=1,...`, `cpus=4,...`, or only the topology
/// (`sockets=2,cores=2,threads=2`: their product).
pub(crate) fn qemu_smp(value: &str) -> Option<u32> {
    let mut topology: Option<u32> = None;
    for (i, part) in value.split(',').enumerate() {
        match part.split_once('=') {
            None if i == 0 => return part.parse().ok(),
            Some(("cpus", n)) => return n.parse().ok(),
            Some(("sockets" | "dies" | "clusters" | "cores" | "threads", n)) => {
                topology = Some(topology.unwrap_or(1).checked_mul(n.parse().ok()?)?);
            }
            _ => {}
        }
    }
    topology
}

/// QEMU `-m`: `512` (MiB), `512M`, `2G`, `1.5G`, or `size=2G,slots=...,maxmem=...`.
pub(crate) fn qemu_memory(value: &str) -> Option<u64> {
    let size = value
        .split(',')
        .find_map(|part| match part.split_once('=') {
            None => Some(part),
            Some(("size", v)) => Some(v),
            Some(_) => None,
        })?;
    parse_size(size, MIB)
}

/// Cloud Hypervisor `--cpus boot=4,max=8`.
pub(crate) fn cloud_hypervisor_cpus(value: &str) -> Option<u32> {
    value
        .split(',')
        .find_map(|part| part.strip_prefix("boot="))
        .and_then(|n| n.parse().ok())
}

/// Cloud Hypervisor `--memory size=1G,...` (a size without suffix is bytes).
pub(crate) fn cloud_hypervisor_memory(value: &str) -> Option<u64> {
    let size = value
        .split(',')
        .find_map(|part| part.strip_prefix("size="))?;
    parse_size(size, 1)
}

/// `<number>[K|M|G|T]` (binary multiples, either case, optional `B`/`iB` after the letter);
/// `unit` is the multiple of a bare number.
fn parse_size(text: &str, unit: u64) -> Option<u64> {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    let suffix = suffix
        .trim_end_matches(['B', 'b'])
        .trim_end_matches(['I', 'i']);
    let multiple = match suffix {
        "" if text.ends_with(['B', 'b']) => 1,
        "" => unit,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        _ => return None,
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiple);
    }
    let fractional: f64 = number.parse().ok()?;
    let bytes = fractional * multiple as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_config_file() {
        let json = r#"{"boot-source": {"kernel_image_path": "k"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}}"#;
        assert_eq!(
            firecracker(json),
            Allocation {
                vcpus: Some(2),
                memory_bytes: Some(1024 * MIB)
            }
        );
        assert_eq!(firecracker("{}"), Allocation::default());
        assert_eq!(firecracker("not json"), Allocation::default());
        let partial = r#"{"machine-config": {"vcpu_count": 4}}"#;
        assert_eq!(
            firecracker(partial),
            Allocation {
                vcpus: Some(4),
                memory_bytes: None
            }
        );
    }

    #[test]
    fn qemu_smp_forms() {
        let cases = [
            ("4", Some(4)),
            ("cpus=4,sockets=1,cores=4,threads=1", Some(4)),
            ("8,sockets=2,cores=4", Some(8)),
            ("sockets=2,cores=2,threads=2", Some(8)),
            ("maxcpus=8", None),
            ("x", None),
        ];
        for (value, want) in cases {
            assert_eq!(qemu_smp(value), want, "-smp {value}");
        }
    }

    #[test]
    fn qemu_memory_forms() {
        let cases = [
            ("512", Some(512 * MIB)),
            ("512M", Some(512 * MIB)),
            ("512m", Some(512 * MIB)),
            ("2G", Some(2048 * MIB)),
            ("1.5G", Some(1536 * MIB)),
            ("524288K", Some(512 * MIB)),
            ("size=2G,slots=4,maxmem=8G", Some(2048 * MIB)),
            ("1024,slots=2,maxmem=4G", Some(1024 * MIB)),
            ("slots=2", None),
            ("12Q", None),
            ("", None),
        ];
        for (value, want) in cases {
            assert_eq!(qemu_memory(value), want, "-m {value}");
        }
    }

    #[test]
    fn cloud_hypervisor_forms() {
        assert_eq!(cloud_hypervisor_cpus("boot=4,max=8"), Some(4));
        assert_eq!(cloud_hypervisor_cpus("max=8"), None);
        let cases = [
            ("size=1G", Some(1 << 30)),
            ("size=512M,shared=on", Some(512 * MIB)),
            ("shared=on,size=2048M", Some(2048 * MIB)),
            ("size=1073741824", Some(1 << 30)),
            ("hotplug_size=1G", None),
        ];
        for (value, want) in cases {
            assert_eq!(cloud_hypervisor_memory(value), want, "--memory {value}");
        }
    }

    #[test]
    fn sources_from_command_lines() {
        let args =
            |line: &str| -> Vec<String> { line.split_whitespace().map(str::to_owned).collect() };
        let qemu = args("qemu-system-x86_64 -name guest=a -m 2G -smp cpus=2");
        assert_eq!(
            source(Some(Hypervisor::Qemu), &qemu, None),
            AllocationSource::CommandLine(Allocation {
                vcpus: Some(2),
                memory_bytes: Some(2 << 30)
            })
        );
        let ch = args("cloud-hypervisor --cpus boot=3 --memory size=768M --api-socket /x/y");
        assert_eq!(
            source(Some(Hypervisor::CloudHypervisor), &ch, None),
            AllocationSource::CommandLine(Allocation {
                vcpus: Some(3),
                memory_bytes: Some(768 * MIB)
            })
        );
        let fc = args("firecracker --no-api --uuid u");
        assert_eq!(
            source(Some(Hypervisor::Firecracker), &fc, Some("/d")),
            AllocationSource::FirecrackerFile(ConfigFile::InInstanceDir("/d/vmm.json".into()))
        );
        assert_eq!(
            source(Some(Hypervisor::Firecracker), &fc, None),
            AllocationSource::Unknown
        );
        // --config-file wins over the folder.
        let fc = args("firecracker --config-file /etc/other.json");
        assert_eq!(
            source(Some(Hypervisor::Firecracker), &fc, Some("/d")),
            AllocationSource::FirecrackerFile(ConfigFile::Absolute("/etc/other.json".into()))
        );
        let fc = args("firecracker --config-file vmm.json");
        assert_eq!(
            source(Some(Hypervisor::Firecracker), &fc, Some("/d")),
            AllocationSource::FirecrackerFile(ConfigFile::RelativeToCwd("vmm.json".into()))
        );
        assert_eq!(source(None, &qemu, None), AllocationSource::Unknown);
    }
}
