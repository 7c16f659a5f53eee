//! A fault-injecting TCP proxy on 127.0.0.1, placed between clients and a ZooKeeper server, so a
//! test can cut or blackhole the connection at a chosen moment and heal it later.

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards everything.
    None,
    /// Closes every open connection and refuses new ones at once.
    Cut,
    /// Keeps connections open but forwards nothing, like a network that drops every packet.
    Blackhole,
}

/// A running proxy; it stops when dropped.
pub struct FaultProxy {
    address: SocketAddr,
    fault: watch::Sender<Fault>,
    /// Dropping it stops the proxy thread.
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl FaultProxy {
    /// Starts a proxy to `target` on a free loopback port.
    pub fn start(target: SocketAddr) -> FaultProxy {
        assert!(
            target.ip().is_loopback(),
            "the proxy only forwards to loopback, not {target}"
        );
        let (fault, fault_rx) = watch::channel(Fault::None);
        let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
        let (address_tx, address_rx) = std::sync::mpsc::channel();

        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
                address_tx.send(listener.local_addr().unwrap()).unwrap();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        if *fault_rx.borrow() == Fault::Cut {
                            drop(client);
                            continue;
                        }
                        tokio::spawn(relay(client, target, fault_rx.clone()));
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = shutdown_rx => {}
                }
            });
        });

        let address = address_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the proxy binds a port");
        FaultProxy {
            address,
            fault,
            _shutdown: shutdown_tx,
        }
    }

    /// Returns the `host:port` clients connect to.
    pub fn connect_string(&self) -> String {
        self.address.to_string()
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

/// Copies bytes both ways until either side closes or the current fault stops the copy.
async fn relay(mut client: TcpStream, target: SocketAddr, mut fault: watch::Receiver<Fault>) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut up = [0u8; 16 * 1024];
    let mut down = [0u8; 16 * 1024];

    loop {
        tokio::select! {
            read = client_read.read(&mut up) => {
                let Ok(count) = read else { return };
                if count == 0 {
                    return;
                }
                if *fault.borrow() == Fault::None && server_write.write_all(&up[..count]).await.is_err() {
                    return;
                }
            }
            read = server_read.read(&mut down) => {
                let Ok(count) = read else { return };
                if count == 0 {
                    return;
                }
                if *fault.borrow() == Fault::None && client_write.write_all(&down[..count]).await.is_err() {
                    return;
                }
            }
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow() == Fault::Cut {
                    return;
                }
            }
        }
    }
}
