//! Test plugin: probes the sandbox from the inside with plain `std` (and wasi-libc's
//! `getentropy`), and reports what it saw as a JSON object in its error, for `tests/sandbox.rs`
//! to check each guarantee ARCHITECTURE.md states. `mode` picks the probe:
//!
//! - `probe`: filesystem (`/`, `.`, the file named by `path`, creating a file), environment,
//!   network (TCP and UDP to 127.0.0.1:`port`, name lookup), wall and monotonic clocks, random
//!   bytes, and a static call counter (1 on every call when nothing is kept between calls);
//! - `grow`: allocates and touches `grow_mb` MiB of guest memory;
//! - `churn`: `rounds` times, makes the host allocate a tensor the size of the first target's
//!   weight and drops the handle; `hoard` keeps every handle instead;
//! - `spin`: never returns;
//! - `trial`: magnitude masks at `trial_density` for the comma-separated `layers`, and the
//!   calibration loss with none, the first, and all of them applied.
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use espalier_plugin_sdk::*;

const NAME: &str = "probe-sandbox";

/// Counts calls in this instance: a fresh instance per call always reports 1.
static CALLS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    /// wasi-libc's entropy source (`wasi:random/random.get-random-bytes` underneath), as
    /// getrandom-style crates use it.
    fn getentropy(buf: *mut u8, len: usize) -> i32;
}

/// A flat JSON object written by hand (the guest has no serde): values are numbers, booleans
/// or strings of plain ASCII.
struct Report(String);

impl Report {
    fn new() -> Self {
        Report(String::from("{"))
    }
    fn raw(&mut self, key: &str, value: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        let _ = write!(self.0, "\"{key}\":{value}");
    }
    fn bool(&mut self, key: &str, v: bool) {
        self.raw(key, if v { "true" } else { "false" });
    }
    fn num(&mut self, key: &str, v: impl std::fmt::Display) {
        self.raw(key, &v.to_string());
    }
    fn text(&mut self, key: &str, v: &str) {
        let clean: String = v
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        self.raw(key, &format!("\"{clean}\""));
    }
    fn finish(mut self) -> String {
        self.0.push('}');
        format!("probe report: {}", self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct P;

impl Guest for P {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: NAME.into(),
            version: "0.0.1".into(),
            description: "A test plugin that probes the sandbox and reports what it saw.".into(),
            params: vec![
                param(
                    "mode",
                    ParamValue::Text("probe".into()),
                    "probe | grow | churn | hoard | spin | trial",
                ),
                param(
                    "port",
                    ParamValue::Integer(0),
                    "a TCP/UDP port on 127.0.0.1 to try (0: none)",
                ),
                param(
                    "path",
                    ParamValue::Text(String::new()),
                    "a host file to try to read",
                ),
                param("grow_mb", ParamValue::Integer(100), "grow: MiB to allocate"),
                param(
                    "rounds",
                    ParamValue::Integer(1000),
                    "churn/hoard: host allocations",
                ),
                param(
                    "layers",
                    ParamValue::Text(String::new()),
                    "trial: comma-separated layers",
                ),
                param(
                    "trial_density",
                    ParamValue::Float(0.5),
                    "trial: kept fraction of each mask",
                ),
            ],
            needs: vec![Need::Weights],
            produces: OutputKind::Masks,
        }
    }

    fn apply(ctx: StageContext) -> Result<StageOutput, String> {
        let params = Params::new(&ctx);
        match params.text("mode")? {
            "probe" => Err(probe(&params)?),
            "grow" => Err(grow(params.integer("grow_mb")?)),
            "churn" => Err(churn(&ctx, params.integer("rounds")?, false)?),
            "hoard" => Err(churn(&ctx, params.integer("rounds")?, true)?),
            "spin" => {
                let mut x: u64 = 1;
                loop {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            "trial" => Err(trial(&params)?),
            other => Err(format!("unknown mode {other:?}")),
        }
    }
}

fn probe(params: &Params) -> Result<String, String> {
    let mut r = Report::new();
    r.num("calls", CALLS.fetch_add(1, Ordering::SeqCst) + 1);

    // Filesystem: with no preopened directory every path fails.
    r.bool("fs_read_dir_root", std::fs::read_dir("/").is_ok());
    r.bool("fs_read_dir_cwd", std::fs::read_dir(".").is_ok());
    let path = params.text("path")?;
    if !path.is_empty() {
        let read = std::fs::read(path);
        r.bool("fs_read_path", read.is_ok());
        if let Err(e) = read {
            r.text("fs_read_error", &e.to_string());
        }
    }
    r.bool(
        "fs_create",
        std::fs::write("espalier-probe.txt", b"x").is_ok(),
    );

    // Environment.
    r.num("env_vars", std::env::vars_os().count());
    r.num("args", std::env::args_os().count());

    // Network: TCP and UDP to a port the test listens on, and a name lookup.
    let port = params.integer("port")?;
    if port > 0 {
        let port = u16::try_from(port).map_err(|_| format!("port {port} out of range"))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let tcp = std::net::TcpStream::connect(addr);
        r.bool("tcp_connect", tcp.is_ok());
        match tcp {
            // Write only: waiting for a reply would hang on a listener that never answers.
            Ok(mut s) => {
                let _ = s.write_all(b"probe");
            }
            Err(e) => r.text("tcp_error", &e.to_string()),
        }
        let udp = std::net::UdpSocket::bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
            .and_then(|s| s.send_to(b"probe", addr));
        r.bool("udp_send", udp.is_ok());
    }
    r.bool(
        "dns_lookup",
        std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 80)).is_ok(),
    );

    // Clocks: the wall clock reads the epoch, the monotonic clock does not move.
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(u128::MAX);
    r.num("wall_ns", wall);
    let start = std::time::Instant::now();
    let mut x: u64 = 1;
    for _ in 0..20_000_000u32 {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    r.num("busy", x % 2);
    r.num("mono_elapsed_ns", start.elapsed().as_nanos());

    // Randomness, through libc and through std's hash-map keys.
    let mut bytes = [0u8; 32];
    // SAFETY: `bytes` is a valid buffer of the length passed; getentropy accepts up to 256.
    let rc = unsafe { getentropy(bytes.as_mut_ptr(), bytes.len()) };
    r.num("getentropy_rc", rc);
    r.text("random", &hex(&bytes));
    let hash = {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(42);
        h.finish()
    };
    r.text("hashmap_hash", &format!("{hash:016x}"));
    Ok(r.finish())
}

fn grow(mb: i64) -> String {
    let bytes = usize::try_from(mb).unwrap_or(0) << 20;
    let mut v: Vec<u8> = Vec::new();
    let ok = v.try_reserve_exact(bytes).is_ok();
    if ok {
        // Touch every page so the memory is really used, not only reserved.
        v.resize(bytes, 1);
    }
    let mut r = Report::new();
    r.bool("grew", ok);
    r.num("grew_mb", if ok { mb } else { 0 });
    r.num(
        "checksum",
        v.iter().step_by(4096).map(|&b| u64::from(b)).sum::<u64>(),
    );
    r.finish()
}

fn churn(ctx: &StageContext, rounds: i64, keep: bool) -> Result<String, String> {
    let first = ctx.targets.first().ok_or("no targets")?;
    let w = model::weight(&first.layer.name)?;
    let mut kept = Vec::new();
    let mut bytes = 0u64;
    for _ in 0..rounds {
        let t = kernels::unary(UnaryOp::Abs, &w);
        bytes += t.numel() * 4;
        if keep {
            kept.push(t);
        }
        // Otherwise dropped here: the host must release its booking.
    }
    let mut r = Report::new();
    r.num("rounds", rounds);
    r.num("bytes", bytes);
    Ok(r.finish())
}

fn trial(params: &Params) -> Result<String, String> {
    let density = params.float("trial_density")?;
    let mut changes = Vec::new();
    for layer in params.text("layers")?.split(',').filter(|s| !s.is_empty()) {
        let w = model::weight(layer)?;
        let mask = kernels::select(
            &kernels::unary(UnaryOp::Abs, &w),
            Structure::Unstructured,
            density,
        )?;
        changes.push((layer.to_string(), mask));
    }
    let (first, first_mask) = changes.first().ok_or("trial: no layers")?;
    let base = calibration::loss()?;
    let single = calibration::loss_with_mask(first, first_mask)?;
    let borrowed: Vec<(String, &Mask)> = changes.iter().map(|(l, m)| (l.clone(), m)).collect();
    let all = calibration::loss_with_masks(&borrowed)?;
    let mut r = Report::new();
    r.num("base", base);
    r.num("single", single);
    r.num("all", all);
    Ok(r.finish())
}

export_criterion!(P);
