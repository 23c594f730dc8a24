//! Property tests of torpor.toml: a config written from any valid services reads back as
//! written; any text at all is a config or an error naming what is wrong, never a panic or a
//! runaway allocation.

use std::collections::BTreeSet;

use proptest::prelude::*;
use torpor_agent::Launch;
use torpor_up::Config;

/// One service: name, gate port, backend port, cpuset, hold queue.
type Service = (String, u16, u16, Option<BTreeSet<usize>>, Option<usize>);

fn services() -> impl Strategy<Value = Vec<Service>> {
    prop::collection::btree_map(
        "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,20}",
        (
            // Gate and backend ports from disjoint ranges, clear of the status API's default.
            20_000u16..30_000,
            30_000u16..40_000,
            prop::option::of(prop::collection::btree_set(0usize..256, 1..8)),
            prop::option::of(1usize..100_000),
        ),
        1..5,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(name, (listen, backend, cpus, hold))| (name, listen, backend, cpus, hold))
            .collect()
    })
    .prop_filter("distinct gate ports", |s: &Vec<Service>| {
        s.iter().map(|s| s.1).collect::<BTreeSet<_>>().len() == s.len()
    })
}

fn render(services: &[Service]) -> String {
    let mut text = String::from("[pool]\ncapacity = \"64MiB\"\n");
    for (name, listen, backend, cpus, hold) in services {
        text.push_str(&format!(
            "\n[[service]]\nname = \"{name}\"\ncommand = [\"/bin/true\"]\nlisten = \"127.0.0.1:{listen}\"\nbackend = \"127.0.0.1:{backend}\"\n"
        ));
        if let Some(cpus) = cpus {
            let list: Vec<String> = cpus.iter().map(usize::to_string).collect();
            text.push_str(&format!("cpuset = \"{}\"\n", list.join(",")));
        }
        if let Some(hold) = hold {
            text.push_str(&format!("[service.policy]\nhold_queue = {hold}\n"));
        }
    }
    text
}

/// Text made of torpor.toml's own keys and values, so random configs get past the TOML parser.
fn toml_like() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        prop::sample::select(vec![
            "[pool]\n",
            "[status]\n",
            "[power]\n",
            "[[service]]\n",
            "[service.policy]\n",
            "[power.node_sleep]\n",
            "name = \"a\"\n",
            "name = \"b\"\n",
            "command = [\"x\"]\n",
            "listen = \"127.0.0.1:1\"\n",
            "backend = \"127.0.0.1:2\"\n",
            "cpuset = \"0-18446744073709551615\"\n",
            "cpuset = \"3-1\"\n",
            "cpuset = \"\"\n",
            "capacity = \"18446744073709551615TiB\"\n",
            "capacity = \"1k\"\n",
            "hold_queue = 0\n",
            "hold_queue = 18446744073709551615\n",
            "idle_threshold = \"99999999999999999999s\"\n",
            "after = \"1s\"\n",
            "sleep = []\n",
            "wake = [\"true\"]\n",
            "protocol = \"tcp\"\n",
            "wake_with = [\"a\"]\n",
            "wake_with = [\"b\"]\n",
            "user = \"nobody\"\n",
            "rlimits = { nofile = 1 }\n",
            "target_utilisation = nan\n",
            "profile = \"x\"\n",
            "address = \"unix:/x\"\n",
            "token_file = \"/t\"\n",
            "spill_dir = \"/s\"\n",
        ])
        .prop_map(str::to_string),
        "[ -~]{0,8}",
    ];
    prop::collection::vec(token, 0..40).prop_map(|t| t.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_config_reads_back_as_written(services in services()) {
        let c = Config::from_toml(&render(&services)).unwrap();
        prop_assert_eq!(c.services.len(), services.len());
        for (got, (name, listen, backend, cpus, hold)) in c.services.iter().zip(&services) {
            prop_assert_eq!(&got.spec.name, name);
            prop_assert_eq!(got.listen.port(), *listen);
            prop_assert_eq!(got.spec.backend.port(), *backend);
            // Unset, the hold queue's default follows the file limit (checked in config's tests).
            if let Some(hold) = hold {
                prop_assert_eq!(got.hold_queue, *hold);
            }
            let Launch::Process(p) = &got.spec.launch else {
                panic!("a command is a process launch");
            };
            let want: Vec<usize> = cpus.iter().flatten().copied().collect();
            prop_assert_eq!(&p.cpus, &want);
        }
    }

    #[test]
    fn any_text_as_torpor_toml_never_panics(text in any::<String>()) {
        let _ = Config::from_toml(&text);
    }

    #[test]
    fn torpor_toml_like_text_never_panics(text in toml_like()) {
        let _ = Config::from_toml(&text);
    }
}

#[test]
fn a_cpuset_beyond_any_machine_is_refused_by_its_key() {
    // Before cpulist had a bound this line hung `torpor up` and then exhausted its memory.
    let mut services: Vec<Service> = vec![("a".to_string(), 1, 2, None, None)];
    let text = render(&services).replace(
        "backend = \"127.0.0.1:2\"\n",
        "backend = \"127.0.0.1:2\"\ncpuset = \"0-18446744073709551615\"\n",
    );
    let e = Config::from_toml(&text).unwrap_err().to_string();
    assert!(e.starts_with("service[0].cpuset"), "{e}");
    services[0].3 = Some([0, 8191].into());
    Config::from_toml(&render(&services)).expect("the highest CPU a kernel can have");
}
