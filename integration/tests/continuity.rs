//! The collector outlives the agent: the upgrade drill under live OTLP
//! load, and the faults around the collector runtime's own unit.

use linkmesh_integration::drill::{Drill, check};

type R = anyhow::Result<()>;

/// The seeds' upgrade order walked with a steady load into the collector:
/// server, runtime, the agent by every install method, the agent killed,
/// the server away for a minute. Nothing is lost, the collector restarts
/// only for its own upgrade, the identity and instance uid never change.
#[test]
fn the_upgrade_drill_loses_no_telemetry() -> R {
    let drill = Drill::setup("lm-drill")?;
    let outcome = drill.run()?;
    eprintln!("{}", serde_json::to_string_pretty(&outcome.figures())?);
    check(&outcome)
}
