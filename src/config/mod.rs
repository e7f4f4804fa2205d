//! Configuration: one YAML file.
//!
//! The serde structs (every one `deny_unknown_fields`), one file per section:
//! - `root`: `Config`, the whole file, and the `gateway:` section,
//! - `broker`: the local listeners, users and router limits,
//! - `store`: the on-disk buffer,
//! - `uplink`: the upstream broker connection; `url`: its URL parser (`Endpoint`); `forward`:
//!   forward and downlink rules and rule matching,
//! - `gpio`: GPIO inputs and outputs; `serial`: serial sensors and `Parity`, the line setting
//!   shared with Modbus RTU; `modbus` (public): the `modbus:` and `onewire:` sections,
//! - `ops`: log, status socket and stats, metrics, Home Assistant discovery,
//! - `protocol`: `Protocol`, the MQTT version of a listener or the uplink,
//! - `secret`: `Secret` (never printed) and `SecretSource` (inline, file or environment),
//! - `units`: human durations and sizes.
//!
//! Around them:
//! - `load`: read + parse (errors carry file, line, column and field path) + resolve secrets,
//! - `validate`: pure checks that collect every problem, not just the first; `check_files` is the
//!   separate check that referenced certificates, keys and password files can be opened;
//!   `validate/modbus.rs` checks the `modbus:` and `onewire:` sections,
//! - `problem`: `Problem`, one thing wrong (field path, line, message), shared by load and checks,
//! - `topic` (public): MQTT topic/filter rules shared by validation and the data path.
//!
//! Imports between these files run one way (sections -> `units`/`secret`/`protocol`/`topic`,
//! `root` -> sections, `validate`/`load` -> `root`), so there is no circle. Every public name is
//! re-exported here as `crate::config::Name`. The YAML crate is used only inside `load` (and
//! tests), so it can be swapped.

mod broker;
mod forward;
mod gpio;
mod load;
pub mod modbus;
mod ops;
mod problem;
mod protocol;
mod root;
mod secret;
mod serial;
mod store;
pub mod topic;
mod units;
mod uplink;
mod url;
mod validate;

pub use broker::{AllowAnonymous, BrokerConfig, BrokerTlsConfig, UserConfig, WebsocketConfig};
pub use forward::{DownlinkRule, ForwardRule, WhileOffline};
pub use gpio::{
    EdgeKind, GpioBackendKind, GpioConfig, GpioInputConfig, GpioOutputConfig, PinSpec, Pull,
    SimStep, Switch,
};
pub use load::{load, load_offline, load_str, warnings, ConfigError};
pub use ops::{
    HomeAssistantConfig, LogConfig, LogFormat, MetricsConfig, StatusConfig, StatusSocket, RUN_DIR,
};
pub use problem::Problem;
pub use protocol::Protocol;
pub use root::{Config, GatewayConfig};
pub use secret::{Secret, SecretSource};
pub use serial::{
    FlowControl, Parity, PollConfig, SerialConfig, SerialFormat, SerialPortConfig, SerialSimConfig,
};
pub use store::{StoreConfig, SyncMode, WhenFull};
pub use units::{ByteSize, HumanDuration};
pub use uplink::{UplinkConfig, UplinkTlsConfig};
pub use url::Endpoint;
pub use validate::{check_files, validate};

/// Exit code for a configuration error (EX_CONFIG from sysexits.h).
pub const EXIT_CONFIG: i32 = 78;
