// buildkit-solve: a build on Docker 20.10's BuildKit through its gRPC endpoint (/grpc), as buildx's
// docker driver does. Test-only. The classic `docker build` (API /build) never asks for an entitlement
// other than network.host, so a build that needs security.insecure has to speak to BuildKit's control
// API itself. Built from Debian's Go packages (GOPATH mode); it uses BuildKit's control API and session
// packages directly, not its client package (which needs a newer fsutil than Debian ships).
//
//	buildkit-solve -sock /path/docker.sock -frontend REF -context DIR [-file NAME]
//	               [-opt key=value]... [-allow security.insecure] -output DIR
//
// The build runs the gateway frontend REF (as `# syntax=REF` does), with the context and the
// Dockerfile's directory sent from DIR, and writes its result to the output directory (local exporter).
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"

	controlapi "github.com/moby/buildkit/api/services/control"
	"github.com/moby/buildkit/identity"
	"github.com/moby/buildkit/session"
	"github.com/moby/buildkit/session/filesync"
	"github.com/moby/buildkit/session/grpchijack"
	"github.com/moby/buildkit/util/entitlements"
	"google.golang.org/grpc"
)

type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	sock := flag.String("sock", "", "the daemon's unix socket")
	frontend := flag.String("frontend", "", "the frontend image")
	ctxDir := flag.String("context", "", "the build context (the Dockerfile is read from it too)")
	file := flag.String("file", "Dockerfile", "the Dockerfile's name in the context")
	output := flag.String("output", "", "where the result goes (local exporter)")
	var opts, allow list
	flag.Var(&opts, "opt", "a frontend option key=value (build-arg:NAME=VALUE, ...)")
	flag.Var(&allow, "allow", "an entitlement to ask for")
	flag.Parse()
	if err := run(*sock, *frontend, *ctxDir, *file, *output, opts, allow); err != nil {
		fmt.Fprintln(os.Stderr, "buildkit-solve:", err)
		os.Exit(1)
	}
}

// hijack opens a connection to the daemon's PATH endpoint upgraded to PROTO (HTTP 101), as the
// docker CLI does for /grpc and /session.
func hijack(ctx context.Context, sock, path, proto string) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: %s\r\nContent-Length: 0\r\n\r\n", path, proto)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		conn.Close()
		return nil, fmt.Errorf("%s: the daemon answered %s", path, resp.Status)
	}
	// The server may speak first (HTTP/2's settings): what the reader holds already is read first.
	return &bufferedConn{conn, br}, nil
}

type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func run(sock, frontend, ctxDir, file, output string, opts, allow []string) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	gc, err := grpc.DialContext(ctx, "docker", grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			return hijack(ctx, sock, "/grpc", "h2c")
		}))
	if err != nil {
		return err
	}
	control := controlapi.NewControlClient(gc)
	attrs := map[string]string{"source": frontend, "filename": file}
	for _, o := range opts {
		i := strings.Index(o, "=")
		if i < 0 {
			return fmt.Errorf("-opt %q: want key=value", o)
		}
		attrs[o[:i]] = o[i+1:]
	}
	var ents []entitlements.Entitlement
	for _, a := range allow {
		e, err := entitlements.Parse(a)
		if err != nil {
			return err
		}
		ents = append(ents, e)
	}
	s, err := session.NewSession(ctx, "buildkit-solve", "")
	if err != nil {
		return err
	}
	s.Allow(filesync.NewFSSyncProvider([]filesync.SyncedDir{{Name: "context", Dir: ctxDir}, {Name: "dockerfile", Dir: ctxDir}}))
	s.Allow(filesync.NewFSSyncTargetDir(output))
	go s.Run(ctx, grpchijack.Dialer(control))
	defer s.Close()

	ref := identity.NewID()
	logsDone := make(chan struct{})
	go func() { // the build's progress: finished steps, their errors and output, on stderr
		defer close(logsDone)
		st, err := control.Status(ctx, &controlapi.StatusRequest{Ref: ref})
		if err != nil {
			return
		}
		for {
			resp, err := st.Recv()
			if err != nil {
				return
			}
			for _, v := range resp.Vertexes {
				if v.Error != "" {
					fmt.Fprintf(os.Stderr, "error %s: %s\n", v.Name, v.Error)
				} else if v.Completed != nil {
					fmt.Fprintf(os.Stderr, "done %s\n", v.Name)
				}
			}
			for _, l := range resp.Logs {
				os.Stderr.Write(l.Msg)
			}
		}
	}()
	_, err = control.Solve(ctx, &controlapi.SolveRequest{
		Ref: ref, Exporter: "local", Session: s.ID(), Frontend: "gateway.v0", FrontendAttrs: attrs, Entitlements: ents,
	})
	cancel()
	<-logsDone
	return err
}
