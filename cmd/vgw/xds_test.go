package main

import (
	"context"
	"testing"
	"time"

	"github.com/jonboulle/clockwork"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/vgw-project/vgw/envoy"
	"github.com/vgw-project/vgw/extproc"
	"github.com/vgw-project/vgw/extproc/extproctest"
	"github.com/vgw-project/vgw/xds/xdstest"
)

// impostor opens an ADS stream to vgw as node that asks for clusters and
// never acknowledges anything: a process on the models' network, or a
// misconfigured second Envoy under the same id.
func impostor(t *testing.T, xdsAddr, node string) {
	t.Helper()
	conn, err := grpc.NewClient(xdsAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := xdstest.Silent(ctx, conn, node); err != nil {
		t.Fatal(err)
	}
}

// TestImpostorOnXDS: an ADS stream that never acknowledges, under the
// Envoy's own node id, holds back none of that Envoy's requests for a
// model that is ready; requests from an Envoy that does not say who it is
// wait for it at most xds_ack_timeout. Such a stream made every request
// for the ready always_on model wait for its deadline, holding its slot,
// then answered 504 load_timeout.
func TestImpostorOnXDS(t *testing.T) {
	s := startStack(t, `
runtime: {kind: sim}
load_timeout: 5s
envoy: {xds_ack_timeout: 1s}
gpus: [{name: sim0, memory: 80GiB}]
models:
  llama: {vram: 30GiB, always_on: true}
`)
	s.servesOnceReady(t, "llama")
	impostor(t, s.app.xdsAddr.String(), s.Node())
	s.eventuallyWithin(t, time.Minute, "the impostor is connected", func() bool {
		nodes, _ := s.app.xds.Status()
		return len(nodes) == 1 && nodes[0].Streams == 2
	}, nil)

	for i, r := range s.askAll(t, "llama", 20) {
		if r.Status != 200 {
			t.Fatalf("request %d of the Envoy: %d %s", i, r.Status, r.Body)
		}
	}
	for _, d := range s.app.ep.Decisions().Recent(extproc.Filter{Model: "llama", Limit: 20}) {
		if d.Outcome != extproc.OutcomeAdmitted || d.Reason != extproc.ReasonSlotFree {
			t.Errorf("decision %v/%v after %v: the Envoy's requests waited", d.Outcome, d.Reason, d.Wait)
		}
	}

	// An Envoy that sends no x-vgw-node: its requests wait until the
	// impostor has been silent for xds_ack_timeout, then go.
	b, err := envoy.Load("../../envoy/envoy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ep, _ := envoy.ExtProc(b)
	f := extproctest.FilterFrom(ep)
	f.Metadata = nil
	f.Clock = clockwork.NewFakeClock()
	conn, err := grpc.NewClient(s.app.extprocAddr.String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	anon := extproctest.New(conn, f, s.Router())
	res, err := anon.Do(context.Background(), extproctest.Request{Body: []byte(`{"model":"llama"}`)})
	if err != nil || res.Status != 200 {
		t.Fatalf("a request of an Envoy that does not say who it is: %+v %v", res, err)
	}
	nodes, _ := s.app.xds.Status()
	if len(nodes) != 1 || nodes[0].Silent != 1 {
		t.Errorf("status %+v, want the impostor's stream shown silent", nodes)
	}
}
