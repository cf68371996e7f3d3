// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vfabric info`: like `fi_info`, for virtio-fabric devices.

use clap::Args;
use vfabric::{getinfo, DeviceLocator, Hints, Info};

use crate::CliError;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Devices to probe (repeatable): a socket path or pci:DDDD:BB:DD.F. Default:
    /// $VFABRIC_DEVICES, else /run/vfabric/*.sock and the virtio-pci fabric devices (vendor
    /// 0x1af4, device 0x1040 + $VFABRIC_DEVICE_ID, default 56).
    #[arg(long = "device")]
    devices: Vec<DeviceLocator>,
    /// Every capability entry and limit.
    #[arg(short, long)]
    verbose: bool,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

fn fi_caps(caps: u64) -> String {
    use vfabric::fi;
    let names = [
        (fi::MSG, "FI_MSG"),
        (fi::TAGGED, "FI_TAGGED"),
        (fi::RMA, "FI_RMA"),
        (fi::ATOMIC, "FI_ATOMIC"),
        (fi::SEND, "FI_SEND"),
        (fi::RECV, "FI_RECV"),
        (fi::READ, "FI_READ"),
        (fi::WRITE, "FI_WRITE"),
        (fi::REMOTE_READ, "FI_REMOTE_READ"),
        (fi::REMOTE_WRITE, "FI_REMOTE_WRITE"),
        (fi::DIRECTED_RECV, "FI_DIRECTED_RECV"),
        (fi::LOCAL_COMM, "FI_LOCAL_COMM"),
        (fi::REMOTE_COMM, "FI_REMOTE_COMM"),
        (fi::SOURCE, "FI_SOURCE"),
    ];
    names
        .iter()
        .filter(|(b, _)| caps & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(" | ")
}

fn print_info(i: &Info, verbose: bool) {
    println!("provider: vfabric");
    println!("    fabric: {}", i.fabric_name);
    println!("    domain: {}", i.domain_name);
    println!("    device: {}", i.device);
    println!("    version: {}", env!("CARGO_PKG_VERSION"));
    println!("    type: {}", i.ep_type.name());
    // The id the daemon announces (`vfabricd --device-id`), else what this driver binds to.
    match vfabric::announced_device_id(&i.vendor_attrs) {
        Some(id) => println!("    protocol: FI_PROTO_VFABRIC (virtio device id {id})"),
        None => println!(
            "    protocol: FI_PROTO_VFABRIC (virtio device id {}, configured)",
            vfabric::configured_device_id().map_or_else(|e| e.to_string(), |id| id.to_string())
        ),
    }
    println!(
        "    fabric id: {:x}  node: {:#018x}  vendor: {:#06x}",
        i.fabric_id, i.node_addr, i.vendor_id
    );
    if !i.remote_hosts.is_empty() {
        let hosts: Vec<String> = i
            .remote_hosts
            .iter()
            .map(|h| {
                format!(
                    "{} ({} device{}, {})",
                    h.host_id,
                    h.num_devices,
                    if h.num_devices == 1 { "" } else { "s" },
                    if h.up { "up" } else { "down" }
                )
            })
            .collect();
        println!("    remote hosts: {}", hosts.join(", "));
    }
    println!("    caps: {}", fi_caps(i.caps));
    println!("    features: {}", i.feature_names.join(" "));
    let l = &i.limits;
    println!(
        "    limits: max_msg_size={} inject_size={} max_endpoints={} max_mrs={} queue_pairs={} max_queue_size={} max_sge={}",
        l.max_msg_size, l.inject_size, l.max_endpoints, l.max_mrs, l.num_queue_pairs, l.max_queue_size, l.max_sge
    );
    if verbose {
        println!("    capabilities (QUERY_CAPS):");
        for e in &i.cap_entries {
            if e.vendor == 0 {
                println!("        [{:>2}] {:<22} = {}", e.key, e.name, e.value);
            }
        }
    }
    println!("    vendor attributes:");
    for e in &i.vendor_attrs {
        println!(
            "        vendor {:#06x} key {:>3} {:<20} = {}",
            e.vendor, e.key, e.name, e.value
        );
    }
}

pub fn run(args: &InfoArgs) -> Result<(), CliError> {
    let hints = Hints {
        devices: (!args.devices.is_empty()).then(|| args.devices.clone()),
        ..Hints::default()
    };
    let infos = match getinfo(&hints) {
        Ok(v) => v,
        Err(vfabric::Error::NoData) => {
            return Err(CliError::Run(
                "no virtio-fabric device found (set VFABRIC_DEVICES or --device)".into(),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if args.json {
        let v: Vec<_> = infos
            .iter()
            .map(|i| {
                serde_json::json!({
                    "domain": i.domain_name, "device": i.device.to_string(), "ep_type": i.ep_type.name(),
                    "node": i.node_addr, "fabric_id": i.fabric_id,
                    "remote_hosts": i.remote_hosts.iter().map(|h| serde_json::json!({
                        "host_id": h.host_id, "devices": h.num_devices, "up": h.up
                    })).collect::<Vec<_>>(),
                    "features": i.feature_names,
                    "max_msg_size": i.limits.max_msg_size, "inject_size": i.limits.inject_size,
                    "caps": i.cap_entries.iter().map(|e| serde_json::json!({
                        "vendor": e.vendor, "key": e.key, "name": e.name, "value": e.value.to_string()
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    for (n, i) in infos.iter().enumerate() {
        if n > 0 {
            println!();
        }
        print_info(i, args.verbose);
    }
    Ok(())
}
