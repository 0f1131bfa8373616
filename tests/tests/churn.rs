//! A few thousand short-lived instances: the kernel's per-thread and per-instance map entries
//! are freed as they come and go, so nothing grows with churn.

use std::time::Duration;

use collector_tests::{Collector, Standin, new_uuid, sample, wait_for};

const INSTANCES: usize = 3000;
/// Stand-ins alive at once.
const WAVE: usize = 50;

fn entries(metrics: &str, map: &str) -> f64 {
    sample(
        metrics,
        &format!("collector_ebpf_map_entries{{map=\"{map}\"}}"),
    )
    .unwrap_or_else(|| panic!("no entries for {map}:\n{metrics}"))
}

#[test]
fn map_entries_do_not_grow_under_churn() {
    // A matcher of this test's own: the map entries counted are this test's instances only,
    // whatever other VMMs run on a shared host.
    let exe = format!("churn{:08x}", std::process::id());
    let collector = Collector::start_with_config(&format!(
        "disable_builtin_matchers = [\"firecracker\", \"qemu\", \"cloud-hypervisor\"]\n\
         [kernel]\nprogram_stats = \"on\"\n\
         [console.files]\n\
         [[matcher]]\nname = \"churn\"\nexecutable = \"{exe}\"\n\
         instance_id = '--uuid (\\S+)'\nvcpu_thread = '^fc_vcpu ?(\\d+)$'\n"
    ));
    let runs = |metrics: &str, program: &str| {
        sample(
            metrics,
            &format!("collector_ebpf_program_runs_total{{program=\"{program}\"}}"),
        )
        .unwrap()
    };
    let before = collector.get_text("/metrics");
    let mut peak_threads = 0.0f64;
    let mut peak_stats = 0.0f64;
    for wave in 0..INSTANCES / WAVE {
        let mut vmms: Vec<Standin> = (0..WAVE)
            .map(|_| {
                let uuid = new_uuid("churn");
                Standin::spawn(
                    &exe,
                    &["--no-api", "--uuid", &uuid],
                    &[
                        ("STANDIN_VCPUS", "2"),
                        ("STANDIN_TICK_MS", "2"),
                        ("STANDIN_RUN_MS", "40"),
                    ],
                )
            })
            .collect();
        if wave % 10 == 0 {
            let metrics = collector.get_text("/metrics");
            peak_threads = peak_threads.max(entries(&metrics, "sched_threads"));
            peak_stats = peak_stats.max(entries(&metrics, "sched_stats"));
        }
        for vmm in &mut vmms {
            vmm.child.wait().expect("wait stand-in");
        }
    }
    // Every process is gone: give the exit events a moment to be read.
    let settled = wait_for(Duration::from_secs(10), || {
        let metrics = collector.get_text("/metrics");
        let empty = sample(&metrics, "collector_instances") == Some(0.0)
            && entries(&metrics, "sched_threads") == 0.0
            && entries(&metrics, "sched_stats") == 0.0;
        empty.then_some(metrics)
    });
    let after = collector.get_text("/metrics");
    let new_threads = runs(&after, "sched_wakeup_new") - runs(&before, "sched_wakeup_new");
    eprintln!(
        "{INSTANCES} instances: peak {peak_threads} thread entries, {peak_stats} aggregate \
         entries; after: {} / {}; {new_threads} task creations seen",
        entries(&after, "sched_threads"),
        entries(&after, "sched_stats"),
    );
    let interesting: Vec<&str> = after
        .lines()
        .filter(|l| {
            l.starts_with("collector_") && !l.contains("program_run") && !l.contains("probe_")
        })
        .collect();
    assert!(
        settled.is_some(),
        "entries left after every instance exited:\n{}",
        interesting.join("\n")
    );
    // The test measured something: entries existed while instances ran.
    assert!(peak_threads > 0.0 && peak_stats > 0.0);
    assert!(new_threads >= (INSTANCES * 3) as f64);
    assert_eq!(
        sample(&after, "collector_ebpf_thread_map_full_total"),
        Some(0.0)
    );
    // The thread filter counted every entry in and out: nothing is left counted, or untracked
    // threads in those slots would pay the hash lookup for ever.
    assert_eq!(entries(&after, "sched_thread_filter"), 0.0);
}
