//! Reliability under stress: a storm of reloads during a SYN flood, and SIGKILL in the middle
//! of applying a large policy.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use aya::maps::{Array, LpmTrie, Map, MapData};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use ipnet::{IpNet, Ipv4Net};
use smtpguard_common::{RuleValue, SlotConfig, map_name};
use smtpguard_tests::{
    bench::{Rng, random_v4_prefixes},
    daemon::Daemon,
    frames,
    netns::{Listener, Outcome, PacketSocket, Pair, SERVER_V4, connect, sock},
};

const ALLOWED4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);

/// `count` random IPv4 prefixes that hold neither the unlisted test source nor the flood's
/// sources (198.18.0.0/15), plus the allowed client's /28.
fn allow_list(seed: u64, count: usize) -> Vec<IpNet> {
    let flood: IpNet = "198.18.0.0/15".parse().expect("prefix");
    let mut rng = Rng::new(seed);
    let mut nets: Vec<IpNet> = random_v4_prefixes(&mut rng, count + count / 10)
        .into_iter()
        .filter(|net| {
            !net.contains(&IpAddr::V4(UNLISTED4)) && !flood.contains(net) && !net.contains(&flood)
        })
        .take(count)
        .collect();
    nets.push("192.0.2.0/28".parse().expect("prefix"));
    nets
}

fn write_list(path: &Path, nets: &[IpNet]) {
    let text: String = nets.iter().map(|net| format!("{net}\n")).collect();
    std::fs::write(path, text).expect("write list");
}

fn config(interface: &str, list: &Path) -> String {
    format!(
        "interfaces = [\"{interface}\"]\n[[allow]]\nname = \"provider\"\nfiles = [\"{}\"]\n",
        list.display()
    )
}

#[test]
fn a_reload_storm_under_a_syn_flood_loses_no_allowed_connect_and_passes_no_unlisted_syn() {
    const RELOADS: u64 = 100;
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let dir = std::env::temp_dir().join(format!("sg-storm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let lists = [dir.join("a.txt"), dir.join("b.txt")];
    write_list(&lists[0], &allow_list(1, 1000));
    write_list(&lists[1], &allow_list(2, 1000));
    let mut daemon = Daemon::start(&pair.server, &config(&pair.server_if, &lists[0]));
    let generation = daemon.generation();
    let mac = pair.server_mac();

    let stop = AtomicBool::new(false);
    let (flood_sent, allowed_ok, allowed_failed, unlisted_connected, flood_seen) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    // Behind XDP: only what the program passed.
    let watch = PacketSocket::open(&pair.server, &pair.server_if);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for frame in watch.receive_for(Duration::from_millis(50)) {
                    let Ok(packet) = SlicedPacket::from_ethernet(&frame) else {
                        continue;
                    };
                    if let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) =
                        (&packet.net, &packet.transport)
                        && tcp.syn()
                        && ip.header().source()[..2] == [198, 18]
                    {
                        flood_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        scope.spawn(|| {
            let out = PacketSocket::open(&pair.client, &pair.client_if);
            let mut rng = Rng::new(7);
            while !stop.load(Ordering::Relaxed) {
                let src = Ipv4Addr::new(
                    198,
                    18 + rng.below(2) as u8,
                    rng.below(256) as u8,
                    rng.below(256) as u8,
                );
                let frame = frames::segment_frame(
                    mac,
                    &[],
                    src.into(),
                    SERVER_V4.into(),
                    50000,
                    25,
                    frames::SYN,
                );
                if out.try_send(&frame) {
                    flood_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match connect(
                    &pair.client,
                    ALLOWED4.into(),
                    sock(SERVER_V4, 25),
                    Duration::from_secs(3),
                )
                .0
                {
                    Outcome::Connected => allowed_ok.fetch_add(1, Ordering::Relaxed),
                    _ => allowed_failed.fetch_add(1, Ordering::Relaxed),
                };
                if connect(
                    &pair.client,
                    UNLISTED4.into(),
                    sock(SERVER_V4, 25),
                    Duration::from_millis(100),
                )
                .0 == Outcome::Connected
                {
                    unlisted_connected.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        for reload in 0..RELOADS {
            daemon.reload(&config(&pair.server_if, &lists[(reload as usize + 1) % 2]));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (sent, ok, failed) = (
        flood_sent.load(Ordering::Relaxed),
        allowed_ok.load(Ordering::Relaxed),
        allowed_failed.load(Ordering::Relaxed),
    );
    eprintln!("{RELOADS} reloads: {sent} flood SYNs sent, {ok} allowed connects");
    assert_eq!(
        daemon.generation(),
        generation + RELOADS,
        "every reload applied"
    );
    assert_eq!(
        failed, 0,
        "allowed connects failed during the storm ({ok} succeeded)"
    );
    assert!(ok >= 10, "the allowed client kept connecting: {ok}");
    assert!(sent >= 10_000, "the flood ran: {sent} frames");
    assert_eq!(
        unlisted_connected.load(Ordering::Relaxed),
        0,
        "an unlisted connect got through"
    );
    assert_eq!(
        flood_seen.load(Ordering::Relaxed),
        0,
        "unlisted flood SYNs reached the stack"
    );
    let stats = daemon.stats();
    assert!(stats["dropped"].as_u64().unwrap_or(0) >= sent, "{stats}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The policy generation and IPv4 prefixes the kernel has in force, read from the pins.
fn kernel_policy(instance: &str) -> (u32, BTreeSet<IpNet>) {
    let dir = smtpguard::instance::Instance::new(instance)
        .expect("instance name")
        .maps_dir(smtpguard_common::LAYOUT_STAMP);
    let open = |name: &str| {
        Map::from_map_data(MapData::from_pin(dir.join(name)).expect("pin")).expect("map")
    };
    let active: Array<MapData, u32> = Array::try_from(open(map_name::ACTIVE_SLOT)).expect("active");
    let slot = active.get(&0, 0).expect("active slot") & 1;
    let configs: Array<MapData, SlotConfig> =
        Array::try_from(open(map_name::SLOT_CONFIG)).expect("slots");
    let generation = configs.get(&slot, 0).expect("slot config").generation;
    let name = if slot == 0 {
        map_name::V4_SLOT0
    } else {
        map_name::V4_SLOT1
    };
    // Keys are the scope id, then the address; the prefix length counts both.
    let trie: LpmTrie<MapData, [u8; 8], RuleValue> = LpmTrie::try_from(open(name)).expect("trie");
    let nets = trie
        .keys()
        .map(|key| {
            let key = key.expect("key");
            let data = key.data();
            let address = [data[4], data[5], data[6], data[7]];
            IpNet::V4(Ipv4Net::new(address.into(), (key.prefix_len() - 32) as u8).expect("prefix"))
        })
        .collect();
    (generation, nets)
}

#[test]
fn sigkill_in_the_middle_of_a_100k_apply_leaves_old_or_new_never_a_mix() {
    let pair = Pair::new(&[ALLOWED4.into(), UNLISTED4.into()]);
    let _smtp = Listener::start(&pair.server, 25);
    let dir = std::env::temp_dir().join(format!("sg-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let sets = [allow_list(11, 100_000), allow_list(12, 100_000)];
    let lists = [dir.join("a.txt"), dir.join("b.txt")];
    for (list, nets) in lists.iter().zip(&sets) {
        write_list(list, nets);
    }
    let as_set = |nets: &[IpNet]| nets.iter().copied().collect::<BTreeSet<IpNet>>();
    let sets = [as_set(&sets[0]), as_set(&sets[1])];
    let mut daemon = Daemon::start_timeout(
        &pair.server,
        &config(&pair.server_if, &lists[0]),
        Duration::from_secs(60),
    );
    let mut outcomes = Vec::new();
    // Killed at several points of the apply; the last round waits for the flip and kills
    // right after it.
    for (round, delay_ms) in [Some(0u64), Some(100), Some(300), Some(1000), None]
        .into_iter()
        .enumerate()
    {
        let next = (round + 1) % 2;
        std::fs::write(&daemon.config_path, config(&pair.server_if, &lists[next])).expect("config");
        let generation = daemon.generation() as u32;
        daemon.signal(libc::SIGHUP);
        match delay_ms {
            Some(delay) => std::thread::sleep(Duration::from_millis(delay)),
            None => daemon.wait_for_generation(u64::from(generation) + 1, Duration::from_secs(60)),
        }
        daemon.kill();
        let (in_force, nets) = kernel_policy(&daemon.instance);
        let which = if nets == sets[next] {
            "new"
        } else {
            assert_eq!(
                nets,
                sets[1 - next],
                "round {round}: the kernel holds a mix ({} prefixes)",
                nets.len()
            );
            "old"
        };
        assert_eq!(
            in_force,
            if which == "new" {
                generation + 1
            } else {
                generation
            },
            "round {round}: the generation matches the prefixes"
        );
        // Still enforcing, and a restart recovers: the configuration's policy is applied.
        assert_eq!(
            connect(
                &pair.client,
                UNLISTED4.into(),
                sock(SERVER_V4, 25),
                Duration::from_millis(700)
            )
            .0,
            Outcome::TimedOut
        );
        daemon.restart(&pair.server, u64::from(in_force));
        let (_, nets) = kernel_policy(&daemon.instance);
        assert_eq!(
            nets, sets[next],
            "round {round}: the restart applied the configuration"
        );
        outcomes.push(format!(
            "killed {}: {which}",
            delay_ms.map_or("after the flip".to_owned(), |ms| format!(
                "{ms} ms into the reload"
            ))
        ));
    }
    eprintln!("{}", outcomes.join("; "));
    assert!(
        outcomes.last().is_some_and(|last| last.ends_with("new")),
        "{outcomes:?}"
    );
    assert_eq!(
        connect(
            &pair.client,
            ALLOWED4.into(),
            sock(SERVER_V4, 25),
            Duration::from_millis(700)
        )
        .0,
        Outcome::Connected
    );
    let _ = std::fs::remove_dir_all(&dir);
}
