#!/usr/bin/env bash
# Build a minimal standalone Eureka server (Spring Cloud Netflix) for the
# integration tests. Idempotent: if the jar is already built, just print its path.
#
#   scripts/tools/eureka.sh            -> prints .../eureka-server/target/meshctl-eureka-server.jar
#
# The Maven project (pom.xml, one Application.java, application.properties) is
# generated here, in the tools cache; it is our own tiny app, never committed.
# Settings are tuned for fast tests: no self-registration, no registry fetch,
# no self-preservation, 1 s eviction timer, no read-only response cache.
set -euo pipefail

SPRING_BOOT_VERSION="${SPRING_BOOT_VERSION:-3.5.7}"
SPRING_CLOUD_VERSION="${SPRING_CLOUD_VERSION:-2025.0.0}"
APP_REVISION="1"   # bump when the generated files below change

TOOLS="${MESHCTL_TOOLS:-$HOME/.cache/meshctl-tools}"
PROJ="$TOOLS/src/eureka-server"
JAR="$PROJ/target/meshctl-eureka-server.jar"
STAMP="$PROJ/.built"
WANT="boot=$SPRING_BOOT_VERSION cloud=$SPRING_CLOUD_VERSION rev=$APP_REVISION"

if [[ -f "$JAR" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "$JAR"
  exit 0
fi

command -v mvn >/dev/null || { echo "eureka.sh: 'mvn' not found on PATH; install Maven and a JDK >= 17" >&2; exit 1; }
command -v java >/dev/null || { echo "eureka.sh: 'java' not found on PATH; install a JDK >= 17" >&2; exit 1; }

mkdir -p "$PROJ/src/main/java/io/meshctl/eureka" "$PROJ/src/main/resources"

cat > "$PROJ/pom.xml" <<POM
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0 https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <parent>
    <groupId>org.springframework.boot</groupId>
    <artifactId>spring-boot-starter-parent</artifactId>
    <version>$SPRING_BOOT_VERSION</version>
    <relativePath/>
  </parent>
  <groupId>io.meshctl.tools</groupId>
  <artifactId>meshctl-eureka-server</artifactId>
  <version>1</version>
  <properties>
    <java.version>17</java.version>
    <spring-cloud.version>$SPRING_CLOUD_VERSION</spring-cloud.version>
  </properties>
  <dependencies>
    <dependency>
      <groupId>org.springframework.cloud</groupId>
      <artifactId>spring-cloud-starter-netflix-eureka-server</artifactId>
    </dependency>
  </dependencies>
  <dependencyManagement>
    <dependencies>
      <dependency>
        <groupId>org.springframework.cloud</groupId>
        <artifactId>spring-cloud-dependencies</artifactId>
        <version>\${spring-cloud.version}</version>
        <type>pom</type>
        <scope>import</scope>
      </dependency>
    </dependencies>
  </dependencyManagement>
  <build>
    <finalName>meshctl-eureka-server</finalName>
    <plugins>
      <plugin>
        <groupId>org.springframework.boot</groupId>
        <artifactId>spring-boot-maven-plugin</artifactId>
      </plugin>
    </plugins>
  </build>
</project>
POM

cat > "$PROJ/src/main/java/io/meshctl/eureka/Application.java" <<'JAVA'
package io.meshctl.eureka;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.cloud.netflix.eureka.server.EnableEurekaServer;

/** A standalone Eureka registry for meshctl's integration tests. */
@SpringBootApplication
@EnableEurekaServer
public class Application {
    public static void main(String[] args) {
        SpringApplication.run(Application.class, args);
    }
}
JAVA

cat > "$PROJ/src/main/resources/application.properties" <<'PROPS'
spring.application.name=meshctl-eureka
spring.main.banner-mode=off
server.port=8761
# Standalone: this server neither registers itself nor fetches from peers.
eureka.client.register-with-eureka=false
eureka.client.fetch-registry=false
eureka.client.service-url.defaultZone=http://127.0.0.1:${server.port}/eureka/
eureka.server.wait-time-in-ms-when-sync-empty=0
eureka.server.number-of-replication-retries=0
# Evict expired leases quickly and never protect them.
eureka.server.enable-self-preservation=false
eureka.server.eviction-interval-timer-in-ms=1000
# Serve reads straight from the registry, no 30 s response cache.
eureka.server.use-read-only-response-cache=false
eureka.server.response-cache-update-interval-ms=1000
eureka.server.response-cache-auto-expiration-in-seconds=1
logging.level.root=WARN
logging.level.com.netflix.eureka=WARN
logging.level.com.netflix.discovery=ERROR
PROPS

echo "eureka.sh: building the Eureka server jar in $PROJ (first build downloads from Maven Central)" >&2
(cd "$PROJ" && mvn -q -B -Dstyle.color=never -DskipTests package >&2)
[[ -f "$JAR" ]] || { echo "eureka.sh: mvn succeeded but $JAR is missing" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "$JAR"
