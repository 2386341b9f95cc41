// otlp-receiver: the OpenTelemetry Collector's own OTLP receiver
// (go.opentelemetry.io/collector/receiver/otlpreceiver), run on its own for
// meshctl's tracing tests. Every export request it accepts (OTLP/HTTP on
// /v1/traces, protobuf or JSON, decoded and checked by the collector's code) is
// written as one line of OTLP JSON (the collector's ptrace.JSONMarshaler) to
// the -out file, which the tests read back.
//
//	otlp-receiver -http 127.0.0.1:4318 -out spans.jsonl
package main

import (
	"context"
	"flag"
	"log"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"go.opentelemetry.io/collector/component/componenttest"
	"go.opentelemetry.io/collector/confmap"
	"go.opentelemetry.io/collector/consumer"
	"go.opentelemetry.io/collector/pdata/ptrace"
	"go.opentelemetry.io/collector/receiver/otlpreceiver"
	"go.opentelemetry.io/collector/receiver/receivertest"
)

func main() {
	addr := flag.String("http", "127.0.0.1:4318", "OTLP/HTTP listen address")
	out := flag.String("out", "otlp-spans.jsonl", "file the received traces are appended to (OTLP JSON, one request a line)")
	flag.Parse()

	f, err := os.OpenFile(*out, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		log.Fatal(err)
	}
	var mu sync.Mutex
	marshaler := ptrace.JSONMarshaler{}
	sink, err := consumer.NewTraces(func(_ context.Context, td ptrace.Traces) error {
		b, err := marshaler.MarshalTraces(td)
		if err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		if _, err := f.Write(append(b, '\n')); err != nil {
			return err
		}
		return f.Sync()
	})
	if err != nil {
		log.Fatal(err)
	}

	factory := otlpreceiver.NewFactory()
	cfg := factory.CreateDefaultConfig()
	conf := confmap.NewFromStringMap(map[string]any{
		"protocols": map[string]any{"http": map[string]any{"endpoint": *addr}},
	})
	if err := conf.Unmarshal(cfg); err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	r, err := factory.CreateTraces(ctx, receivertest.NewNopSettings(factory.Type()), cfg, sink)
	if err != nil {
		log.Fatal(err)
	}
	if err := r.Start(ctx, componenttest.NewNopHost()); err != nil {
		log.Fatal(err)
	}
	log.Printf("otlp-receiver: OTLP/HTTP on %s, writing to %s", *addr, *out)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	_ = r.Shutdown(ctx)
}
